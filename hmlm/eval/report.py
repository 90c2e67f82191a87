"""`hmlm eval`: lm-eval tasks x models x memory modes, accuracy per training-frequency bucket, JSON and PNG plots.

The tasks are loaded once; for every model directory and memory mode they run through lm-eval's own evaluation loop
with the `hmlm` adapter (samples logged); each sample of a task that declares its entity (hmlm.eval.entities) is
then placed in a frequency bucket by counting the entity in that model's training corpus (hmlm.eval.buckets).
Common-knowledge (CK) and specific-knowledge (SK) averages follow the paper's split: our tasks declare it in their
metadata, the paper's 13 benchmarks are known by name. Held-out perplexity uses the model directory's held-out
sequences with their stored paths (per-document retrieval) and is also reported per leaf, against the leaf's
training frequency. What a model directory lacks is reported once per model (hmlm.eval.modeldata).
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from rich.console import Console
from rich.table import Table

from . import DEFAULT_BATCH_SIZE, EvalError, quiet
from .buckets import DEFAULT_EDGES, FrequencyCounter, bucket_labels, bucket_of
from .entities import EntityItem, EntitySpec
from .heldout_record import RECORD_FILE
from .tasks import DEFAULT_TASKS, ensure_task_dir

if TYPE_CHECKING:
    from .lane import Lane
    from .removal import RemovalOptions

# the paper's benchmarks (App. B) by their lm-eval names, for CK/SK averages of tasks without our metadata
PAPER_GROUPS = {"lambada_openai": "CK", "boolq": "CK", "squad_completion": "CK", "wsc273": "CK",
                "winogrande": "CK", "coqa": "CK", "hellaswag": "SK", "arc_easy": "SK", "arc_challenge": "SK",
                "triviaqa": "SK", "piqa": "SK", "openbookqa": "SK", "nq_open": "SK"}
ACCURACY_METRICS = ("acc", "exact_match", "acc_norm", "em", "f1")


@dataclass
class EvalOptions:
    models: list[str]
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    memory: list[str] = field(default_factory=lambda: ["fetched", "generic", "none"])
    limit: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str | None = None
    out: str | None = None
    edges: tuple[int, ...] = DEFAULT_EDGES
    include_path: str | None = None
    bucket_source: str = "auto"
    ambiguous: tuple[str, ...] = ()
    perplexity: bool = True
    recompute_perplexity: bool = False   # measure it even where the model dir records the same measurement
    max_gen_toks: int = 32
    embedder_path: str | None = None   # route with this embedder copy ("package": the pip package) instead of
                                       # the one each model's recipe names (hmlm.export.load_model_dir)
    verify: bool = True          # False: load model dirs whose model.json has no checksums (hmlm eval --no-verify)
    removal: "RemovalOptions | None" = None   # the knowledge-removal measurement instead (hmlm.eval.removal)


def task_manager(tasks: Sequence[str], include_path: str | None = None):
    """lm-eval's TaskManager over the hmlm task folder and `include_path` (a folder of the user's own tasks), plus
    lm-eval's own tasks only if a task asked for is in neither (indexing them all takes seconds)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    folders = [str(ensure_task_dir())] + ([str(ensure_task_dir(include_path))] if include_path else [])
    manager = TaskManager(include_path=folders, include_defaults=False)
    if any(t not in set(manager.all_tasks) for t in tasks):
        manager = TaskManager(include_path=folders, include_defaults=True)
    return manager


def load_tasks(manager, tasks: Sequence[str]) -> dict:
    """lm-eval's task dict ({"tasks": {name: Task}, "groups": ...}) for names, tags or groups; loaded once and
    evaluated for every model and memory mode."""
    try:
        task_dict = manager.load(list(tasks))
    except KeyError as exc:
        raise EvalError(f"--tasks: unknown task {exc}; hmlm tasks are in {ensure_task_dir()}") from None
    for task in task_dict["tasks"].values():
        _docs_in_memory(task)
    return task_dict


class DocList(list):
    """A split's documents as plain dicts, with the `features` of the `datasets.Dataset` they came from."""

    def __init__(self, dataset: Any):
        super().__init__(dataset)
        self.features = dataset.features


def _docs_in_memory(task: Any) -> None:
    """The task's splits as lists of the same dicts. lm-eval reads a task's documents from its `datasets.Dataset` in
    every evaluation, which formats each row out of Arrow again (~0.3 s per memory mode for the default tasks); a
    task evaluated under several memory modes reads them from memory instead. A task that post-processes its
    documents (`process_docs`, which may use the Dataset API) or whose splits are not Datasets is left as it is."""
    import datasets

    config = getattr(task, "config", None)
    splits = getattr(task, "dataset", None)
    if config is None or getattr(config, "process_docs", None) is not None or \
            not isinstance(splits, datasets.DatasetDict):
        return
    task.dataset = {name: DocList(split) for name, split in splits.items()}


def run_tasks(lm, task_dict: dict, *, limit: int | None = None, samples: dict[str, list[int]] | None = None) -> dict:
    """lm-eval's evaluation of loaded tasks, prepared as `simple_evaluate` prepares it (its default seeds, zero-shot
    unless a task says otherwise, its few-shot seed), without the extras of simple_evaluate that hmlm does not
    report and that cost seconds per call (an environment dump that runs pip and nvidia-smi, the git hash).
    `samples` ({task: doc ids}, instead of `limit`) evaluates only those items of each task."""
    import random

    import numpy as np
    import torch
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.evaluator import evaluate

    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    for task in task_dict["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    with quiet.no_request_bars():
        return evaluate(lm=lm, task_dict=task_dict, limit=limit, samples=samples, log_samples=True,
                        bootstrap_iters=0)


def entity_specs(task_dict: dict) -> dict[str, EntitySpec]:
    """The tasks that declare the entity of their items (metadata.hmlm_entity), by task name."""
    specs = {}
    for name, task in task_dict["tasks"].items():
        spec = EntitySpec.from_metadata(name, task.config.metadata)
        if spec is not None:
            specs[name] = spec
    return specs


def _primary_metric(sample: dict, config: dict) -> str | None:
    names = [m["metric"] for m in config.get("metric_list") or [] if isinstance(m.get("metric"), str)]
    for name in list(ACCURACY_METRICS) + names:
        if name in sample and isinstance(sample[name], (int, float)):
            return name
    return None


def _knowledge(task: str, config: dict) -> str | None:
    return (config.get("metadata") or {}).get("knowledge") or PAPER_GROUPS.get(task)


def evaluate_modes(loaded, task_dict: dict, modes: Sequence[str], *, limit: int | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, counter: FrequencyCounter | None = None,
                   edges: Sequence[int] = DEFAULT_EDGES, max_gen_toks: int = 32,
                   lane: "Lane | None" = None, after_keys: Callable[[], Any] | None = None) -> dict[str, dict]:
    """{mode: {task: result}} for one loaded model; the core shared by `hmlm eval` and the training callback.
    A result has the task's CK/SK group, its accuracy metric, n, per-bucket accuracy and one row per item.

    Modes that route nothing (none, generic) run first; given a `lane` (hmlm.eval.lane), the first of them hands
    its retrieval keys to it, so they are embedded there while that mode and the next run here, and the routing
    modes find them embedded, and `after_keys` (if given) is queued behind them. Each batch on the caller's thread
    runs on one torch thread while the lane has work, on all of them once it has none (`Lane.threads_beside`).
    Every mode's results are the same in any order (each lm-eval run is seeded alike)."""
    from .adapter import HMLMEvalLM
    from .memory_spec import parse_memory

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    rc = loaded.recipe.index.router
    routes = {m: parse_memory(m, levels=rc.levels, branching=rc.branching).needs_routing for m in modes}
    order = sorted(modes, key=lambda m: routes[m])   # stable: non-routing modes first, each group in given order
    ahead = order[0] if lane is not None and not routes[order[0]] and any(routes.values()) else None
    keys_embedded: list = []   # the lane's futures, checked below so that no error of theirs goes unseen

    def embed_ahead(keys: list[str]) -> None:
        keys_embedded.append(lane.submit(KEYS_PRIORITY, loaded.embed, keys))
        if after_keys is not None and len(keys_embedded) == 1:
            keys_embedded.append(lane.submit(AFTER_KEYS_PRIORITY, after_keys))

    raw = {}
    for mode in order:
        lm = HMLMEvalLM(loaded=loaded, memory=mode, batch_size=batch_size, max_gen_toks=max_gen_toks,
                        embed_ahead=embed_ahead if mode == ahead else None,
                        batch_threads=lane.threads_beside if lane is not None else None)
        raw[mode] = run_tasks(lm, task_dict, limit=limit)
    for future in keys_embedded:
        future.result()
    raw = {mode: raw[mode] for mode in modes}
    items: dict[str, dict[int, EntityItem]] = {}
    if counter is not None and raw:
        # every mode sees the same documents; all tasks' items are resolved together (see FrequencyCounter.prepare)
        first = next(iter(raw.values()))
        for task, spec in entity_specs(task_dict).items():
            items[task] = {s["doc_id"]: spec.item(s["doc"]) for s in first["samples"].get(task, [])}
        counter.prepare([it for per_task in items.values() for it in per_task.values()])
    return {mode: {task: _task_result(task, res, items.get(task), counter, edges) for task in res["samples"]}
            for mode, res in raw.items()}


# on the lane, keys (a routing mode waits for them) before perplexity, and both before what only the report needs
KEYS_PRIORITY, PERPLEXITY_PRIORITY, AFTER_KEYS_PRIORITY = 0, 1, 2


def _task_result(task: str, res: dict, items: dict[int, EntityItem] | None, counter: FrequencyCounter | None,
                 edges: Sequence[int]) -> dict:
    config = res["configs"].get(task, {})
    samples = res["samples"][task]
    metric = _primary_metric(samples[0], config) if samples else None
    labels = bucket_labels(edges)
    has_entity = bool(samples) and items is not None and counter is not None
    rows, per_bucket, counted = [], {b: [] for b in labels}, 0
    for s in samples:
        row: dict[str, Any] = {"doc_id": s["doc_id"]}
        if metric is not None:
            row["correct"] = float(s[metric])
        if s.get("filtered_resps") and isinstance(s["filtered_resps"][0], str):
            row["response"] = s["filtered_resps"][0][:80]
        if has_entity:
            item = items[s["doc_id"]]
            found = counter.count(item)
            row.update(entity=item.name, entity_key=counter.entity(item), flags=counter.flags(item),
                       count=None if found is None else found[0], count_source=None if found is None else found[1])
            if found is not None:
                counted += 1
                row["bucket"] = bucket_of(found[0], edges)
                if metric is not None:
                    per_bucket[row["bucket"]].append(row["correct"])
        rows.append(row)
    metrics = {k.split(",")[0]: v for k, v in res["results"].get(task, {}).items()
               if "," in k and "stderr" not in k and isinstance(v, (int, float))}
    return {
        "knowledge": _knowledge(task, config), "metric": metric, "n": len(samples),
        "value": metrics.get(metric) if metric else None, "metrics": metrics,
        "buckets": {b: {"n": len(v), "acc": (sum(v) / len(v)) if v else None} for b, v in per_bucket.items()}
        if has_entity and counted else None,
        "flagged": sorted({row["entity"] for row in rows if row.get("flags")}) if has_entity else [],
        "items": rows,
    }


def averages(task_results: dict[str, dict]) -> dict[str, float | None]:
    """Avg-CK / Avg-SK: the mean accuracy of the tasks of each group (tasks without an accuracy metric skipped)."""
    out: dict[str, float | None] = {}
    for group in ("CK", "SK"):
        vals = [r["value"] for r in task_results.values()
                if r["knowledge"] == group and r["metric"] in ACCURACY_METRICS and r["value"] is not None]
        out[group] = sum(vals) / len(vals) if vals else None
    return out


def _labels(paths: Sequence[Path]) -> list[str]:
    names = [p.parent.name if p.name == "model" else p.name for p in paths]
    return [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]


def run_eval(opts: EvalOptions, console: Console | None = None) -> dict:
    """Evaluate every model x memory mode, print the tables, write report.json and the plots; return the report."""
    from ..export import load_model_dir
    from .lane import Lane

    console = console or Console()
    if not console.is_terminal and console.width < 160:
        console.width = 160   # a log file or pipe has no width; rich would otherwise fold the table into 80 columns
    t0 = time.perf_counter()
    if not opts.models:
        raise EvalError("hmlm eval: give at least one --model DIR")
    if not opts.tasks:
        raise EvalError("hmlm eval: --tasks is empty")
    paths = [Path(m) for m in opts.models]
    out_dir = Path(opts.out) if opts.out else paths[0].resolve().parent / "eval"
    device = opts.device or ("cuda" if _cuda() else "cpu")
    report: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "options": asdict(opts),
                              "buckets": bucket_labels(opts.edges), "models": []}
    # two streams of work (hmlm.eval.lane): lm-eval's loop of every mode on this thread; on the lane, the first model's
    # load (while lm-eval is imported here), the router's embedder load, the retrieval keys' embeddings (handed over
    # by the first mode that routes nothing) and the held-out perplexity of each mode (large kernels, no routing: the
    # index stores each sequence's path)
    lane = Lane(threads=1)
    try:
        def load(path: Path):
            return load_model_dir(path, device=device, embedder_path=opts.embedder_path, verify=opts.verify)

        first = lane.submit(KEYS_PRIORITY, load, paths[0])
        from . import adapter  # noqa: F401  (its import quiets lm-eval's task loading: hmlm.eval.quiet)

        task_dict = load_tasks(task_manager(opts.tasks, opts.include_path), opts.tasks)
        for i, (path, label) in enumerate(zip(paths, _labels(paths))):
            loaded = first.result() if i == 0 else load(path)
            report["models"].append(_eval_model(loaded, path, label, task_dict, opts, lane, console))
    finally:
        lane.close()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["files"] = write_report(report, out_dir)
    print_report(report, console)
    console.print(f"[bold]eval[/] wrote {', '.join(report['files'].values())} ({report['seconds']} s)")
    return report


def _recorded_perplexity(loaded, data, opts: EvalOptions, modes: Sequence[str], batch_size: int):
    """fit's held-out measurement of this model directory (hmlm.eval.heldout_record) when it is exactly the one this
    eval would make: same weight and shard files (verified on load), device, batch size and versions; else None."""
    from .heldout_record import measurement_key, read_record

    if not modes or not opts.verify or opts.recompute_perplexity or data.heldout != Path(loaded.path):
        return None
    key = measurement_key(loaded.meta, device=loaded.device, batch_size=batch_size,
                          doc_mask=loaded.recipe.data.doc_mask)
    return read_record(loaded.path, key, modes)


def _eval_model(loaded, path: Path, label: str, task_dict: dict, opts: EvalOptions, lane: "Lane",
                console: Console) -> dict[str, Any]:
    """One model's report entry: every memory mode on the tasks, its held-out perplexity, what its directory lacks."""
    from .leafppl import leaf_perplexity
    from .memory_spec import parse_memory
    from .modeldata import EvalData
    from .perplexity import available_modes, leaf_nll

    rc = loaded.recipe.index.router
    have = set(available_modes(loaded))
    modes, skipped = [], {}
    for m in opts.memory:
        spec = parse_memory(m, levels=rc.levels, branching=rc.branching)
        if spec.model_mode not in have:
            skipped[m] = ("no memory bank" if loaded.model.store is None
                          else "trained without a generic block")
        else:
            modes.append(m)
    data = EvalData.of(loaded)
    counter = FrequencyCounter.for_model(data, source=opts.bucket_source, ambiguous=opts.ambiguous)
    console.print(f"[bold]eval[/] {label} ({path}): memory {', '.join(modes) or '-'} on "
                  f"{', '.join(opts.tasks)}" + (f" (skipped: {skipped})" if skipped else ""))
    side = []
    if any(parse_memory(m, levels=rc.levels, branching=rc.branching).needs_routing for m in modes):
        side.append(lane.submit(KEYS_PRIORITY, loaded.load_embedder))
    ppl_modes = [m for m in modes if m in have] if opts.perplexity and data.heldout is not None else []
    ppl_batch = loaded.recipe.trainer.batch_size   # as fit measured it: the same numbers, digit for digit
    recorded = _recorded_perplexity(loaded, data, opts, ppl_modes, ppl_batch)
    ppl_source = "measured"
    if recorded is not None:
        count, nll, created = recorded
        nll_jobs = [_done((count, nll))]
        ppl_source = f"recorded by hmlm fit at {created} ({RECORD_FILE}: same files, same settings)"
    elif getattr(loaded.model.anchor, "concurrent_forward", False):
        nll_jobs = [lane.submit(PERPLEXITY_PRIORITY, leaf_nll, loaded, data.heldout, modes=[m],
                                batch_size=ppl_batch) for m in ppl_modes]
    else:   # an anchor that keeps state on the module between calls runs one forward at a time (protocols)
        nll_jobs = [_done(leaf_nll(loaded, data.heldout, modes=ppl_modes, batch_size=ppl_batch))] \
            if ppl_modes else []
    results = evaluate_modes(loaded, task_dict, modes, limit=opts.limit, batch_size=opts.batch_size,
                             counter=counter, edges=opts.edges, max_gen_toks=opts.max_gen_toks, lane=lane,
                             after_keys=_import_plots)
    for future in side:
        future.result()   # its error, if any, is raised here
    perplexity = None
    if nll_jobs:
        count, nll = {}, {}
        for job in nll_jobs:
            count, per_mode = job.result()
            nll.update(per_mode)
        perplexity = {**leaf_perplexity(data.heldout, count, nll), "source": ppl_source}
        if recorded is not None:
            console.print(f"[bold]eval[/] {label}: held-out perplexity {ppl_source}; "
                          "--recompute-perplexity measures it again", highlight=False)
    entry: dict[str, Any] = {"label": label, "path": str(path), "skipped": skipped,
                             "modes": {m: {"tasks": r, "averages": averages(r)} for m, r in results.items()}}
    if perplexity is not None:
        entry["perplexity"] = perplexity
    entry["notes"] = [n for n in (data.heldout_missing if opts.perplexity else None, data.mentions_missing) if n]
    for note in entry["notes"]:   # once per model, with what it costs
        console.print(f"[yellow]warning[/] {label}: {note}", highlight=False)
    return entry


def _import_plots() -> None:
    """matplotlib's import (~1 s on a 2-core CPU), done on the lane once its other work is queued, not at the end."""
    from . import plots  # noqa: F401


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def print_report(report: dict, console: Console) -> None:
    labels = report["buckets"]
    table = Table(title="accuracy (%) by training frequency of the entity (n items)")
    for col in ("task", "K", "model", "memory", "all"):
        table.add_column(col, justify="right" if col == "all" else "left")
    for b in labels:
        table.add_column(b, justify="right")
    for model in report["models"]:
        for mode, m in model["modes"].items():
            for task, r in m["tasks"].items():
                value = f"{_pct(r['value'])} ({r['n']})" if r["metric"] in ACCURACY_METRICS else \
                    f"{r['metric']}={r['value']:.2f}" if r["value"] is not None else "-"
                cells = [f"{_pct(r['buckets'][b]['acc'])} ({r['buckets'][b]['n']})" if r["buckets"] else ""
                         for b in labels]
                table.add_row(task, r["knowledge"] or "", model["label"], mode, value, *cells)
    console.print(table)
    avg = Table(title="averages and held-out perplexity (per-document retrieval)")
    for col in ("model", "memory", "Avg-CK", "Avg-SK", "held-out ppl"):
        avg.add_column(col, justify="left" if col in ("model", "memory") else "right")
    for model in report["models"]:
        ppl = (model.get("perplexity") or {}).get("overall", {})
        for mode, m in model["modes"].items():
            a = m["averages"]
            avg.add_row(model["label"], mode, _pct(a["CK"]), _pct(a["SK"]),
                        f"{ppl[mode]:.2f}" if mode in ppl else "-")
    console.print(avg)
    flagged = sorted({e for model in report["models"] for m in model["modes"].values()
                      for r in m["tasks"].values() for e in r["flagged"]})
    if flagged:
        console.print(f"ambiguous entities (counts mix senses or entities; see report.json flags): "
                      f"{', '.join(flagged)}", highlight=False)


def write_report(report: dict, out_dir: Path) -> dict[str, str]:
    from ..utils import write_json
    from .plots import plot_bucket_accuracy, plot_leaf_perplexity

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out_dir / "report.json"), "buckets_png": str(out_dir / "accuracy_by_bucket.png")}
    plot_bucket_accuracy(report, Path(files["buckets_png"]))
    if any(m.get("perplexity") for m in report["models"]):
        files["perplexity_png"] = str(out_dir / "perplexity_by_leaf_frequency.png")
        plot_leaf_perplexity(report, Path(files["perplexity_png"]))
    write_json(Path(files["json"]), {**report, "files": files})
    return files


def eval_from_args(args, console: Console) -> dict:
    """`hmlm eval` (argparse namespace from hmlm.cli) -> run_eval."""
    from .buckets import parse_edges

    def split(s: str | None) -> list[str]:
        return [x.strip() for x in (s or "").split(",") if x.strip()]

    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit {args.limit}: must be >= 1")
    removal = None
    if getattr(args, "removal", False):
        from .removal import DEFAULT_TASKS as REMOVAL_TASKS, removal_options

        if args.memory is not None:
            raise EvalError("--removal scores the memory fetched, blocked and none itself; leave out --memory")
        removal = removal_options(args)
    elif any(getattr(args, k, None) is not None for k in ("removal_levels", "removal_share", "removal_entities",
                                                    "removal_rule", "removal_budget_s")):
        raise EvalError("--removal-levels/--removal-share/--removal-entities/--removal-rule/--removal-budget-s only "
                        "go with --removal")
    default_tasks = list(REMOVAL_TASKS) if removal is not None else list(DEFAULT_TASKS)
    opts = EvalOptions(models=list(args.model), tasks=split(args.tasks) or default_tasks,
                       memory=split(args.memory or "fetched,generic,none"), limit=args.limit,
                       batch_size=args.batch_size or DEFAULT_BATCH_SIZE, device=args.device,
                       out=args.out, edges=parse_edges(args.buckets), include_path=args.include_path,
                       bucket_source=args.bucket_source, ambiguous=tuple(split(args.ambiguous)),
                       perplexity=not args.no_perplexity, max_gen_toks=args.max_gen_toks,
                       recompute_perplexity=getattr(args, "recompute_perplexity", False),
                       embedder_path=getattr(args, "embedder_path", None),
                       verify=not getattr(args, "no_verify", False), removal=removal)
    if removal is not None:
        from .removal import run_removal

        return run_removal(opts, console)
    if not opts.memory:
        raise EvalError("--memory is empty; use e.g. fetched,generic,none")
    return run_eval(opts, console)

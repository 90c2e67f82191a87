"""`hmlm eval --removal`: the paper's knowledge-removal measurement (its §6 / Fig. 6b: atomic-number accuracy falls
when the memory that holds the facts is blocked). For each entity of the evaluated tasks (tasks that declare their
items' entity, hmlm.eval.entities) and each measured tree level:

  1. the block: the nodes of that level that hold its training mentions, by `hmlm.knowledge.removal_nodes` (the node
     holding the most of them, plus every node holding >= --removal-share of them), read from the model
     directory's mentions/ (word index + each training document's path);
     With `--removal-rule route` instead: the nodes of that level its own items are routed to (the paper's
     "best-matching" part of the bank; it tells whether what the items fetch holds the fact, wherever the
     entity's documents went);
  2. the entity's own items are scored with the memory fetched, fetched with those nodes blocked
     (`blocked:<level>:<node>[+...]`: descent falls back to the nearest unblocked sibling) and with no memory;
  3. the control: every other entity's items are scored under the same block; they should keep their fetched
     accuracy.

Scoring is `hmlm eval`'s: lm-eval's loop with the `hmlm` adapter (hmlm.eval.report.run_tasks), so each task's own
metric decides; generation tasks also get the log-probability of the reference answer from the adapter's scorer
(the one NLL loop). It is cheap because a block changes only the items whose path crosses a blocked node, and an
item's result depends only on the path it fetches from: every item is routed under every block set first (prompt
embeddings are cached per model; routing is all it costs), then each distinct (item, new path) pair is scored once,
the pairs of all block sets together in large batches (hmlm.eval.rescore: lm-eval's requests of the fetched run,
replayed with each request's path pinned, and the task's own filters and metric). A single-node block reroutes an
item only when it blocks one of the item's own nodes, so there are about items x levels pairs however many entities
are removed. An item whose path is unchanged fetches exactly the blocks it fetched before and keeps its fetched
result (decoding is greedy and per request; tests/test_removal.py checks the shortcut against scoring everything
with lm-eval under the block). The pairs are scored level by level; `--removal-budget-s` stops before the budget
is overrun, and the levels not finished are named in the report instead of measured.

Entities no training document mentions (nothing to block) and entities flagged as ambiguous (their mentions mix
senses or entities, so their nodes are not theirs alone) are left out and counted. `--removal-entities N` keeps N
entities spread evenly over the ranking by training mentions (all by default).

Writes removal.json (per entity and per level), removal.md (the tables) and removal.png (accuracy with the memory
fetched / blocked / none, the removed entity's items beside the other entities', one panel per level) into --out.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from . import EvalError

MODES = ("fetched", "blocked", "none")
RULES = ("mentions", "route")
DEFAULT_TASKS = ("hmlm_atomic_number",)   # the paper's removal task


@dataclass
class RemovalOptions:
    levels: tuple[int, ...] = ()          # 1-based levels to block at (empty: every level of the tree)
    min_share: float = 0.1                # block every node of the level holding >= this share of the mentions
    rule: str = "mentions"                # mentions: nodes holding its training mentions; route: its items' nodes
    entities: int | None = None           # at most this many entities, spread over the mention ranking
    budget_s: float | None = None         # stop rescoring after this many seconds; the levels not done are skipped


def removal_options(args) -> RemovalOptions:
    """RemovalOptions from `hmlm eval --removal`'s flags (hmlm.cli), each checked with the flag named."""
    levels: tuple[int, ...] = ()
    if args.removal_levels:
        try:
            levels = tuple(int(v) for v in args.removal_levels.split(",") if v.strip())
        except ValueError:
            raise EvalError(f"--removal-levels {args.removal_levels!r}: expected comma-separated levels such as "
                            "1,2,3 (level 1 = the root's children)") from None
    share = RemovalOptions.min_share if args.removal_share is None else float(args.removal_share)
    if not 0 < share <= 1:
        raise EvalError(f"--removal-share {share}: must be in (0, 1] (e.g. 0.1: nodes holding >= 10% of the "
                        "entity's training mentions)")
    if args.removal_entities is not None and args.removal_entities < 1:
        raise EvalError(f"--removal-entities {args.removal_entities}: must be >= 1")
    rule = args.removal_rule or RemovalOptions.rule
    if rule not in RULES:
        raise EvalError(f"--removal-rule {rule!r}: expected {' or '.join(RULES)}")
    budget = getattr(args, "removal_budget_s", None)
    if budget is not None and budget <= 0:
        raise EvalError(f"--removal-budget-s {budget}: must be > 0 seconds")
    return RemovalOptions(levels=levels, min_share=share, entities=args.removal_entities, rule=rule, budget_s=budget)


@dataclass
class Item:
    """One task item: where it routes and how it scores."""

    task: str
    doc_id: int
    key: str                                  # retrieval key (the prompt, for generation tasks)
    entity: str                               # entity key (hmlm.eval.entities.EntityBook)
    name: str
    correct: dict[str, float] = field(default_factory=dict)      # fetched / none
    logp: dict[str, float] = field(default_factory=dict)

    @property
    def id(self) -> tuple[str, int]:
        return self.task, self.doc_id


# ---- scoring ---------------------------------------------------------------------------------------------------

def _subset(task_dict: dict, names) -> dict:
    return {"tasks": {n: task_dict["tasks"][n] for n in names}, "groups": {}}


def score(loaded, task_dict: dict, memory: str, *, ids: Sequence[tuple[str, int]] | None = None,
          limit: int | None = None, batch_size: int = 32, max_gen_toks: int = 32
          ) -> dict[tuple[str, int], tuple[float, float | None, dict]]:
    """{(task, doc_id): (correct, log p(reference answer) for a generation item else None, lm-eval's sample)} of the
    tasks' items under one memory mode: the items `ids`, else every item up to `limit` per task."""
    from .adapter import HMLMEvalLM
    from .report import _primary_metric, run_tasks

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HMLMEvalLM(loaded=loaded, memory=memory, batch_size=batch_size, max_gen_toks=max_gen_toks)
    if ids is not None:
        samples: dict[str, list[int]] = {}
        for task, doc in ids:
            samples.setdefault(task, []).append(doc)
        if not samples:   # lm-eval reads an empty list as "every item"
            return {}
        res = run_tasks(lm, _subset(task_dict, samples), samples={t: sorted(d) for t, d in samples.items()})
    else:
        res = run_tasks(lm, task_dict, limit=limit)
    out, pairs = {}, {}
    for task, rows in res["samples"].items():
        config = res["configs"].get(task, {})
        for s in rows:
            metric = _primary_metric(s, config)
            if metric is None:
                raise EvalError(f"--removal: task {task} reports no accuracy metric ({', '.join(s['metrics'])})")
            out[(task, s["doc_id"])] = (float(s[metric]), None, s)
            pair = _answer_pair(task_dict["tasks"][task], s)
            if pair is not None:
                pairs[(task, s["doc_id"])] = pair
    for i, (ll, _) in zip(pairs, lm.loglikelihood(list(pairs.values())) if pairs else []):
        out[i] = (out[i][0], ll, out[i][2])
    return out


def retrieval_key(task: str, sample: dict) -> str:
    """The text the adapter routes this item by: hmlm.eval.adapter.retrieval_keys over the item's requests (a
    generation item's: its context)."""
    from .adapter import retrieval_keys

    return retrieval_keys([SimpleNamespace(args=tuple(a), doc_id=sample["doc_id"], task_name=task)
                           for a in sample["arguments"]])[0]


def _answer_pair(task, sample: dict) -> tuple[str, str] | None:
    """(context, delimiter + reference answer) of a generation item, for log p(answer); None for other items."""
    args = sample["arguments"][0]
    target = sample.get("target")
    if not isinstance(args[1], dict) or not isinstance(target, str) or not target.strip():
        return None
    delimiter = getattr(task.config, "target_delimiter", " ")
    return args[0], (delimiter if not target.startswith(delimiter) else "") + target


# ---- the measurement -------------------------------------------------------------------------------------------

def collect_items(loaded, task_dict: dict, counter, *, limit: int | None, batch_size: int, max_gen_toks: int
                  ) -> tuple[list[Item], dict]:
    """Every item of the tasks that declare their entity, scored with the memory fetched and with none; and the
    requests lm-eval built for them (hmlm.eval.rescore.capture), to score them again on other paths."""
    from .report import entity_specs
    from .rescore import capture

    specs = entity_specs(task_dict)
    if not specs:
        raise EvalError(f"--removal: none of the tasks {', '.join(task_dict['tasks'])} declares the entity of its "
                        "items (metadata.hmlm_entity; docs/eval.md); e.g. --tasks hmlm_atomic_number")
    tasks = _subset(task_dict, specs)
    fetched = score(loaded, tasks, "fetched", limit=limit, batch_size=batch_size, max_gen_toks=max_gen_toks)
    requests = capture(tasks)   # before the next run rebuilds the tasks' instances
    none = score(loaded, tasks, "none", ids=list(fetched), batch_size=batch_size, max_gen_toks=max_gen_toks)
    entities = {i: specs[i[0]].item(s["doc"]) for i, (_, _, s) in fetched.items()}
    counter.prepare(list(entities.values()))
    items = []
    for i, (ok, ll, s) in sorted(fetched.items()):
        it = Item(i[0], i[1], retrieval_key(i[0], s), counter.entity(entities[i]), entities[i].name)
        it.correct = {"fetched": ok, "none": none[i][0]}
        if ll is not None:
            it.logp = {"fetched": ll, "none": none[i][1]}
        items.append(it)
    return items, {it.id: requests[it.id] for it in items}


def choose_entities(ranked: list[str], n: int | None) -> list[str]:
    """`n` entities spread evenly over `ranked` (most mentioned first), the first and the last included."""
    if n is None or n >= len(ranked):
        return list(ranked)
    if n <= 0:
        return []
    if n == 1:
        return ranked[:1]
    return [ranked[round(i * (len(ranked) - 1) / (n - 1))] for i in range(n)]


def measure(loaded, task_dict: dict, data, counter, opts: RemovalOptions, *, limit: int | None = None,
            batch_size: int = 32, max_gen_toks: int = 32, console: Console | None = None,
            progress: bool = True) -> dict[str, Any]:
    """The removal measurement of one loaded model (module docstring): per level, per entity, and the summary."""
    from ..knowledge import blocked_memory, entity_nodes, removal_nodes

    t0 = time.perf_counter()
    deadline = None if opts.budget_s is None else t0 + opts.budget_s
    console = console or Console(quiet=not progress)
    rc = loaded.recipe.index.router
    levels = tuple(opts.levels) or tuple(range(1, rc.levels + 1))
    bad = [lv for lv in levels if not 1 <= lv <= rc.levels]
    if bad:
        raise EvalError(f"--removal-levels {','.join(map(str, levels))}: the tree has levels 1..{rc.levels}")
    if not 0 < opts.min_share <= 1:
        raise EvalError(f"--removal-share {opts.min_share}: must be in (0, 1]")
    if data.mention_index() is None:
        raise EvalError(f"--removal: {data.label}: {data.mentions_missing}")
    items, requests = collect_items(loaded, task_dict, counter, limit=limit, batch_size=batch_size,
                                    max_gen_toks=max_gen_toks)
    by_entity: dict[str, list[Item]] = {}
    for it in items:
        by_entity.setdefault(it.entity, []).append(it)
    hits, left_out = {}, {"never mentioned": [], "ambiguous": []}
    for key in by_entity:
        if counter.book.flags(key):
            left_out["ambiguous"].append(key)
            continue
        found = entity_nodes(data, counter.book.spellings[key])
        if not found:
            left_out["never mentioned"].append(key)
            continue
        hits[key] = found
    mentions = {k: sum(h.mentions for h in found if h.level == 1) for k, found in hits.items()}
    ranked = sorted(hits, key=lambda k: (-mentions[k], k))
    chosen = choose_entities(ranked, opts.entities)

    # 1. every block set, and where it sends each item whose path crosses a blocked node (routing only: cheap)
    keys = [it.key for it in items]
    base = loaded.route(keys)
    own = {k: [i for i, it in enumerate(items) if it.entity == k] for k in chosen}
    blocks: dict[tuple[int, str], list] = {}       # (level, entity) -> the nodes blocked
    moved: dict[str, dict[tuple[str, int], tuple[int, ...]]] = {}   # block set -> {rerouted item: its new path}
    for lv in levels:
        for k in chosen:
            if opts.rule == "route":
                nodes = route_nodes(hits[k], lv, {int(base[i, lv - 1]) for i in own[k]})
            else:
                nodes = removal_nodes(hits[k], lv, opts.min_share)
            blocks[(lv, k)] = nodes
            spec = blocked_memory(nodes)
            if spec not in moved:
                paths = loaded.route(keys, blocked=[(h.level - 1, h.node) for h in nodes])
                changed = (paths != base).any(dim=1)
                moved[spec] = {items[i].id: tuple(paths[i].tolist()) for i in changed.nonzero().flatten().tolist()}
    # 2. score each distinct (item, new path) once, every block set's together, a level's before the next level's
    from .rescore import Job, PinnedPathsLM, order_jobs, rescore

    lm = PinnedPathsLM(loaded=loaded, memory="fetched", batch_size=batch_size, max_gen_toks=max_gen_toks)
    phases: dict[int, list[Job]] = {}
    seen: set[Job] = set()
    for lv in levels:
        new = {Job(i, p) for k in chosen for i, p in moved[blocked_memory(blocks[(lv, k)])].items()} - seen
        seen |= new
        phases[lv] = order_jobs(lm, requests, list(new))
    naive = sum(len(m) for m in moved.values())
    console.print(f"removal: {len(moved)} block sets reroute {naive} items; {len(seen)} distinct (item, path) "
                  f"pairs to score ({time.perf_counter() - t0:.1f} s so far)", highlight=False)
    results: dict[Job, tuple[float, float | None]] = {}
    done: list[int] = []
    with _progress(console, progress) as bar:
        task_id = bar.add_task("removal: rescoring rerouted items", total=len(seen))
        for lv in levels:
            t1 = time.perf_counter()
            got = rescore(lm, task_dict, requests, phases[lv], chunk=max(64, 4 * batch_size), deadline=deadline,
                          advance=lambda n: bar.advance(task_id, n))
            results.update(got)
            if len(got) < len(phases[lv]):
                break
            done.append(lv)
            console.print(f"removal: level {lv}: {len(got)} items scored in {time.perf_counter() - t1:.1f} s "
                          f"({time.perf_counter() - t0:.1f} s so far)", highlight=False)
    skipped = [lv for lv in levels if lv not in done]
    if skipped:
        console.print(f"[yellow]removal: --removal-budget-s {opts.budget_s:g} ran out; level(s) "
                      f"{', '.join(map(str, skipped))} not measured[/]", highlight=False)
    # 3. per level and entity: its block's results
    per_entity = {k: {"entity": k, "name": by_entity[k][0].name, "mentions": mentions[k], "items": len(by_entity[k]),
                      "levels": {}} for k in chosen}
    for lv in done:
        for k in chosen:
            nodes = blocks[(lv, k)]
            spec = blocked_memory(nodes)
            rescored = {i: results[Job(i, p)] for i, p in moved[spec].items()}
            total = max(1, sum(h.mentions for h in hits[k] if h.level == lv))
            per_entity[k]["levels"][str(lv)] = _entity_row(
                items, k, spec, rescored, set(moved[spec]),
                nodes=[{"node": h.node, "mentions": h.mentions, "share": round(h.mentions / total, 4),
                        "documents": h.documents, "node_documents": h.node_documents} for h in nodes])
    return {"levels": done, "levels_skipped": skipped, "rule": opts.rule, "min_share": opts.min_share,
            "entities_measured": len(chosen),
            "entities_with_mentions": len(ranked), "left_out": {k: sorted(v) for k, v in left_out.items()},
            "items": len(items), "block_sets": len(moved), "rerouted_items": naive, "scored_pairs": len(results),
            "seconds": round(time.perf_counter() - t0, 1),
            "summary": {str(lv): summarize([e["levels"][str(lv)] for e in per_entity.values()]) for lv in done},
            "entities": list(per_entity.values())}


def _progress(console: Console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not enabled, transient=True)


def route_nodes(hits: Sequence, level: int, routed: set[int]) -> list:
    """The `--removal-rule route` block: the nodes of `level` the entity's own items are routed to, with the entity's
    training mentions in each (NodeHits from its `entity_nodes`; zero counts for a node none of its documents is
    in)."""
    from ..knowledge import NodeHits

    known = {h.node: h for h in hits if h.level == level}
    return [known.get(n, NodeHits(level, n, 0, 0, 0)) for n in sorted(routed)]


def _entity_row(items: list[Item], entity: str, spec: str, rescored: dict, moved: set, *, nodes: list) -> dict:
    """One entity under its block at one level: correct counts and log p sums of its items and of the others'."""
    row: dict[str, Any] = {"memory": spec, "nodes": nodes}
    for group, members in (("removed", [it for it in items if it.entity == entity]),
                           ("others", [it for it in items if it.entity != entity])):
        g: dict[str, Any] = {"n": len(members), "rerouted": sum(it.id in moved for it in members)}
        for mode in MODES:
            g[mode] = sum(_result(it, mode, rescored)[0] for it in members)
        with_logp = [it for it in members if it.logp]
        g["logp_n"] = len(with_logp)
        for mode in MODES:
            g[f"logp_{mode}"] = sum(_result(it, mode, rescored)[1] for it in with_logp)
        # facts the model states with its memory that it still states under the block
        known = [it for it in members if it.correct["fetched"] > 0]
        g["known"] = len(known)
        g["known_kept"] = sum(_result(it, "blocked", rescored)[0] for it in known)
        row[group] = g
    return row


def _result(it: Item, mode: str, rescored: dict) -> tuple[float, float]:
    if mode == "blocked":
        ok, ll = rescored.get(it.id, (it.correct["fetched"], it.logp.get("fetched")))
        return ok, ll if ll is not None else 0.0
    return it.correct[mode], it.logp.get(mode, 0.0)


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Pooled over entities (every item counted once per entity it is removed with or controls for): accuracy per
    mode, mean log p(answer) per mode, the share of items rerouted and of known facts kept."""
    out = {}
    for group in ("removed", "others"):
        n = sum(r[group]["n"] for r in rows)
        ln = sum(r[group]["logp_n"] for r in rows)
        known = sum(r[group]["known"] for r in rows)
        g: dict[str, Any] = {"n": n, "rerouted": _ratio(sum(r[group]["rerouted"] for r in rows), n),
                             "known": known, "known_kept": _ratio(sum(r[group]["known_kept"] for r in rows), known)}
        for mode in MODES:
            g[f"acc_{mode}"] = _ratio(sum(r[group][mode] for r in rows), n)
            g[f"logp_{mode}"] = _ratio(sum(r[group][f"logp_{mode}"] for r in rows), ln)
        out[group] = g
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


# ---- the command -----------------------------------------------------------------------------------------------

def run_removal(opts, console: Console | None = None) -> dict:
    """`hmlm eval --removal` (opts: hmlm.eval.report.EvalOptions with `removal` set): measure every model, print the
    tables, write removal.json / removal.md / removal.png; return the report."""
    from ..export import load_model_dir
    from ..utils import write_json, write_text
    from .buckets import FrequencyCounter
    from .modeldata import EvalData
    from .report import _cuda, _labels, load_tasks, task_manager

    console = console or Console()
    if not console.is_terminal and console.width < 160:
        console.width = 160   # a log file or pipe has no width; rich would fold the table into 80 columns
    t0 = time.perf_counter()
    paths = [Path(m) for m in opts.models]
    out_dir = Path(opts.out) if opts.out else paths[0].resolve().parent / "eval"
    task_dict = load_tasks(task_manager(opts.tasks, opts.include_path), opts.tasks)
    device = opts.device or ("cuda" if _cuda() else "cpu")
    report: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "tasks": list(opts.tasks),
                              "limit": opts.limit, "removal": asdict(opts.removal), "models": []}
    for path, label in zip(paths, _labels(paths)):
        loaded = load_model_dir(path, device=device, embedder_path=opts.embedder_path, verify=opts.verify)
        if loaded.model.store is None:
            raise EvalError(f"--removal: {path} has no memory bank (trained in anchor mode): nothing to block")
        data = EvalData.of(loaded)
        counter = FrequencyCounter.for_model(data, source=opts.bucket_source, ambiguous=opts.ambiguous)
        console.print(f"[bold]removal[/] {label} ({path}) on {', '.join(opts.tasks)}", highlight=False)
        result = measure(loaded, task_dict, data, counter, opts.removal, limit=opts.limit,
                         batch_size=opts.batch_size, max_gen_toks=opts.max_gen_toks, console=console)
        report["models"].append({"label": label, "path": str(path), **result})
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out_dir / "removal.json"), "markdown": str(out_dir / "removal.md"),
             "png": str(out_dir / "removal.png")}
    report["files"] = files
    write_json(Path(files["json"]), report)
    write_text(Path(files["markdown"]), markdown(report))
    from .plots import plot_removal

    plot_removal(report, Path(files["png"]))
    print_removal(report, console)
    console.print(f"[bold]removal[/] wrote {', '.join(files.values())} ({report['seconds']} s)", highlight=False)
    return report


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _lp(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


SUMMARY_COLUMNS = ("model", "level", "items", "acc fetched", "acc blocked", "acc none", "log p fetched",
                   "log p blocked", "log p none", "rerouted", "known kept")


def summary_rows(report: dict) -> list[list[str]]:
    rows = []
    for model in report["models"]:
        for lv in model["levels"]:
            s = model["summary"][str(lv)]
            for group, label in (("removed", "removed entity"), ("others", "other entities")):
                g = s[group]
                rows.append([model["label"], f"{lv} ({label})", str(g["n"]), _pct(g["acc_fetched"]),
                             _pct(g["acc_blocked"]), _pct(g["acc_none"]), _lp(g["logp_fetched"]),
                             _lp(g["logp_blocked"]), _lp(g["logp_none"]), _pct(g["rerouted"]),
                             f"{_pct(g['known_kept'])} of {g['known']}"])
    return rows


def markdown(report: dict) -> str:
    r = report["removal"]
    rule = (f"the node holding most of its training mentions plus every node holding >= {r['min_share']:.0%} of "
            "them" if r["rule"] == "mentions" else "the nodes its own items are routed to")
    lines = [f"# Knowledge removal ({', '.join(report['tasks'])})", "",
             f"Block per entity and level (rule `{r['rule']}`): {rule}. Accuracy (%) and mean log p(answer) of the removed entity's items and, "
             "under the same block, of the other entities' items; `rerouted`: items whose path the block changed; "
             "`known kept`: items right with the memory fetched that are still right under the block.", ""]
    lines += ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(report)]
    for model in report["models"]:
        lo = model["left_out"]
        skipped = model.get("levels_skipped") or []
        lines += ["", f"{model['label']}: {model['entities_measured']} of {model['entities_with_mentions']} entities "
                  f"with training mentions measured ({model['items']} items, {model['block_sets']} distinct block "
                  f"sets rerouting {model.get('rerouted_items', '-')} items, {model.get('scored_pairs', '-')} "
                  f"distinct (item, path) pairs scored); left out: {len(lo['never mentioned'])} never mentioned, "
                  f"{len(lo['ambiguous'])} ambiguous."
                  + (f" Not measured (--removal-budget-s {report['removal']['budget_s']:g} ran out): level(s) "
                     f"{', '.join(map(str, skipped))}." if skipped else ""), "", "| entity | mentions | level | blocked | items right fetched / blocked / none "
                  "| others rerouted |", "|---|---:|---:|---|---|---:|"]
        for e in model["entities"]:
            for lv, row in e["levels"].items():
                g = row["removed"]
                lines.append(f"| {e['name']} | {e['mentions']} | {lv} | {row['memory']} | {g['fetched']:g} / "
                             f"{g['blocked']:g} / {g['none']:g} of {g['n']} | {row['others']['rerouted']} |")
    return "\n".join(lines) + "\n"


def print_removal(report: dict, console: Console) -> None:
    table = Table(title=f"knowledge removal on {', '.join(report['tasks'])}: the removed entity's items vs the other "
                        "entities' under the same block (accuracy %, mean log p of the answer)")
    for col in SUMMARY_COLUMNS:
        table.add_column(col, justify="left" if col in ("model", "level") else "right")
    for row in summary_rows(report):
        table.add_row(*row)
    console.print(table)

"""The small-scale reproduction of the paper's main result (issue 12): S / 2S / S+memory / S+generic / post-hoc.

One part = expand the demo corpus -> index it (one index per seed, shared by the part's runs) -> train each run for
exactly `epochs` epochs of the index (equal tokens for every run of a part) -> `hmlm eval` of every model on the
demo fact tasks (held-out templates), the held-out text controls and held-out perplexity -> summary.json and a
Fig.-1-style plot (accuracy against training frequency, one line per run). Each part is self-contained, so two
GPU calls can run the two seeds without sharing files; `merge` combines their summaries on any machine.

Driven by benchmarks/gpu_repro.py (which makes carried packages importable first); docs/results.md has the method
and commands. Every step writes the summary again, so a part cut short still leaves what it finished.
"""
from __future__ import annotations

import gc
import json
import math
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

BUCKET_LABELS = ("0", "1-9", "10-99", "100-999", ">=1000")


@dataclass(frozen=True)
class Run:
    key: str                     # label in the summary and the plot
    recipe: str                  # file under the recipe folder (tiny twins add -tiny)
    modes: tuple[str, ...]       # memory modes evaluated
    headline: str                # the mode whose accuracy is the run's line in the plot
    needs: str | None = None     # run whose model is this one's anchor.init_from


RUNS = {r.key: r for r in (
    Run("S", "demo-S", ("none",), "none"),
    Run("2S", "demo-2S", ("none",), "none"),
    Run("S+mem", "demo-S-mem", ("fetched", "generic", "none"), "fetched"),
    Run("S+generic", "demo-S-generic", ("generic", "none"), "generic"),
    Run("S->mem frozen", "demo-S-posthoc", ("fetched", "generic", "none"), "fetched", needs="S"),
)}
# two GPU calls: one seed each; every part trains S and S+mem first (the headline), then the rest
PARTS = {"1": (0, ("S", "S+mem", "2S", "S+generic")),
         "2": (1, ("S", "S+mem", "2S", "S->mem frozen")),
         "all": (0, ("S", "S+mem", "2S", "S+generic", "S->mem frozen"))}
ASSUMED_TOKENS_PER_S = 300_000    # before the first run has been timed (docs/results.md: GPU assumptions)


@dataclass
class Options:
    out: Path
    part: str = "1"
    seed: int | None = None               # default: the part's seed
    runs: tuple[str, ...] | None = None   # default: the part's runs
    recipes: Path = Path("recipes/demo")
    tiny: bool = False                    # the -tiny CPU twins (recipes/demo/tiny)
    demo: Path = Path(".repro/demo")
    embedder_path: str | None = None      # index.embedder.path (a copy from `hmlm embedder export`)
    work: Path = Path("runs/repro")
    corpus_seed: int = 0                  # fact choice and repeat counts: the same in every part
    facts_per_relation: int = 250
    text_mb: float | None = None
    epochs: float = 1.0
    budget_s: float = 520.0               # start no run that would not finish (with its eval) within this
    eval_s_per_model: float = 30.0        # reserved per model for evaluation when planning runs
    eval_limit: int | None = None
    eval_batch_size: int = 64
    qa: bool = False                      # also the question templates
    compile: bool = False
    overrides: tuple[str, ...] = ()
    log: Callable[[str], None] = print
    started: float = field(default_factory=time.perf_counter)


def elapsed(opts: Options) -> float:
    return time.perf_counter() - opts.started


# ---------------------------------------------------------------- recipes

def recipe_for(opts: Options, run: Run, seed: int, corpus: Path, index_dir: Path, extra: Sequence[str] = ()):
    from ..config import load_recipe

    folder = opts.recipes / "tiny" if opts.tiny else opts.recipes
    name = f"{run.recipe}-tiny" if opts.tiny else run.recipe
    over = [f"data.corpus={corpus}", f"index.dir={index_dir}", f"seed={seed}",
            f"out_dir={opts.work / 'runs' / f'{run.recipe}-s{seed}'}", *opts.overrides, *extra]
    if opts.compile:
        over.append("trainer.compile=true")
    recipe = load_recipe(folder / f"{name}.yaml", over)
    if opts.embedder_path and recipe.index.embedder.name == "minilm":
        recipe.index.embedder.path = str(opts.embedder_path)   # the copy that travelled; twins use hashing
    return recipe


def params(recipe, vocab: int) -> dict[str, int]:
    from ..model import size_report

    rep = size_report(recipe, vocab)
    embedding = vocab * rep["anchor_shape"]["d_model"]
    return {"anchor": rep["anchor_params"], "anchor_non_embedding": rep["anchor_params"] - embedding,
            "fetched": rep["fetched_params_per_sequence"], "generic": rep["generic_params"],
            "bank": rep["bank_params"], "inference": rep["anchor_params"] + rep["fetched_params_per_sequence"]}


# ---------------------------------------------------------------- steps

class Part:
    """One part's state and summary; `save()` after every step."""

    def __init__(self, opts: Options):
        self.opts = opts
        seed, runs = PARTS[opts.part]
        self.seed = seed if opts.seed is None else opts.seed
        self.runs = list(opts.runs or runs)
        unknown = [r for r in self.runs if r not in RUNS]
        if unknown:
            raise ValueError(f"--runs: unknown {unknown}; known: {', '.join(RUNS)}")
        self.corpus_dir = opts.work / "corpus"
        self.index_dir = opts.work / f"index-s{self.seed}"
        self.summary: dict[str, Any] = {"part": opts.part, "seed": self.seed, "tiny": opts.tiny,
                                        "device": _device(), "versions": _versions(), "steps": {},
                                        "options": {k: str(v) for k, v in vars(opts).items()
                                                    if k not in ("log", "started")},
                                        "runs": {}}
        self.model_dirs: dict[str, Path] = {}
        self.reports: list[dict] = []
        self.tasks: list[str] = []

    def save(self) -> None:
        from ..utils import write_json

        self.summary["elapsed_s"] = round(elapsed(self.opts), 1)
        write_json(self.opts.out / "summary.json", self.summary)

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        self.opts.log(f"[{elapsed(self.opts):6.1f} s] {name}")
        try:
            return fn()
        finally:
            self.summary["steps"][name] = round(time.perf_counter() - t0, 1)
            self.save()

    # -- corpus and index
    def expand(self) -> dict:
        from ..data.demo_corpus import expand_demo

        if (self.corpus_dir / "demo.json").is_file():
            s = json.loads((self.corpus_dir / "demo.json").read_text())
            if (s.get("seed"), s.get("facts_per_relation"), s.get("text_mb")) == (
                    self.opts.corpus_seed, self.opts.facts_per_relation, self.opts.text_mb):
                return self._corpus_summary(s)
        s = expand_demo(self.opts.demo, self.corpus_dir, seed=self.opts.corpus_seed,
                        facts_per_relation=self.opts.facts_per_relation, text_mb=self.opts.text_mb)
        return self._corpus_summary(s)

    def _corpus_summary(self, s: dict) -> dict:
        self.tasks = _fact_tasks(s["tasks"], self.opts.qa) + [t for t in s["tasks"] if "heldout" in t]
        keep = ("facts", "fact_sentences", "buckets", "sources", "heldout_docs", "facts_per_relation", "text_mb")
        self.summary["corpus"] = {k: s[k] for k in keep} | {"tasks": self.tasks}
        return s

    def index(self) -> None:
        from ..index import ensure_index, read_index_meta

        recipe = recipe_for(self.opts, RUNS["S"], self.seed, self.corpus_dir / "corpus.jsonl", self.index_dir)
        ensure_index(recipe)
        meta = read_index_meta(self.index_dir)
        self.vocab = _vocab(meta)
        per_step = recipe.trainer.batch_size
        self.max_steps = max(1, int(self.opts.epochs * meta["counts"]["train_sequences"] // per_step))
        self.summary["index"] = {"counts": meta["counts"], "embedder": meta["embedder"],
                                 "router": meta["router"]["name"], "branching": meta["router"]["branching"],
                                 "levels": meta["router"]["levels"], "build_seconds": meta.get("build_seconds"),
                                 "tokenizer_vocab": meta["tokenizer"]["vocab_size"], "max_steps": self.max_steps,
                                 "epochs": self.opts.epochs, "tokens_per_step": per_step * meta["seq_len"]}

    # -- training
    def train(self, key: str) -> None:
        from ..train.fit import fit

        run = RUNS[key]
        entry: dict[str, Any] = {"recipe": run.recipe, "seed": self.seed, "modes": list(run.modes),
                                 "headline": run.headline}
        self.summary["runs"][key] = entry
        extra = [f"trainer.max_steps={self.max_steps}"]
        if run.needs:
            if run.needs not in self.model_dirs:
                entry["status"] = f"skipped: needs the model of {run.needs}, which this part did not train"
                return
            extra.append(f"anchor.init_from={self.model_dirs[run.needs]}")
        recipe = recipe_for(self.opts, run, self.seed, self.corpus_dir / "corpus.jsonl", self.index_dir, extra)
        entry["params"] = params(recipe, self.vocab)
        tokens = self.max_steps * recipe.trainer.batch_size * recipe.data.seq_len
        entry.update(steps=self.max_steps, tokens=tokens)
        # fixed cost per run (trainer start-up, final held-out perplexity, export): the largest seen so far, >= 10 s
        overhead = max([10.0] + [r["wall_seconds"] - r["train_seconds"] for r in self.summary["runs"].values()
                                 if r.get("status") == "ok"])
        estimate = tokens / self._throughput(entry["params"]) + overhead
        reserve = self._eval_reserve(run)     # earlier runs are already evaluated (run_part)
        if elapsed(self.opts) + estimate + reserve > self.opts.budget_s:
            entry["status"] = (f"skipped: would end at ~{elapsed(self.opts) + estimate:.0f} s with "
                               f"{reserve:.0f} s reserved for eval, over the {self.opts.budget_s:.0f} s budget")
            self.opts.log(f"  {key}: {entry['status']}")
            return
        t0 = time.perf_counter()
        # the final held-out perplexity per mode needs no lm-eval, so it is there even if the evaluation fails;
        # overwrite: a re-run of the driver on the same --work replaces the part's own earlier run of this recipe
        result = fit(recipe, progress=False, final_eval=True, overwrite=True)
        entry["wall_seconds"] = round(time.perf_counter() - t0, 1)
        entry["train_seconds"] = result["seconds"]
        entry["tokens_per_s"] = round(tokens / max(result["seconds"], 1e-9))
        entry["fit_heldout_ppl"] = result.get("heldout_perplexity")
        entry["status"] = "ok"
        self.model_dirs[key] = Path(result["model_dir"])
        shutil.rmtree(Path(recipe.out_dir) / "checkpoints", ignore_errors=True)
        self.opts.log(f"  {key}: {self.max_steps} steps, {tokens:,} tokens in {result['seconds']} s "
                      f"({entry['tokens_per_s']:,} tokens/s)")
        _free_memory()

    def _eval_reserve(self, run: Run) -> float:
        """Seconds to keep for evaluating `run`: --eval-s-per-model, or more where the evaluations so far took
        longer per memory mode (a model with memory is evaluated in up to three modes)."""
        per_mode = [r["eval_seconds"] / len(r["modes"]) for r in self.summary["runs"].values() if "eval_seconds" in r]
        return max([self.opts.eval_s_per_model] + [s * len(run.modes) for s in per_mode])

    def _throughput(self, p: dict[str, int]) -> float:
        """Tokens/s expected for a run of these parameters, scaled from the runs timed so far (compute ~ the
        parameters a token touches), or the assumed rate before any."""
        timed = [r for r in self.summary["runs"].values() if r.get("status") == "ok"]
        if not timed:
            return ASSUMED_TOKENS_PER_S
        cost = lambda q: q["anchor"] + q["fetched"]  # noqa: E731
        return min(r["tokens_per_s"] * cost(r["params"]) / cost(p) for r in timed)

    # -- evaluation
    def evaluate(self, key: str) -> None:
        from rich.console import Console

        from ..eval.report import EvalOptions, run_eval

        run, entry = RUNS[key], self.summary["runs"][key]
        out = self.opts.work / "eval" / f"{run.recipe}-s{self.seed}"
        opts = EvalOptions(models=[str(self.model_dirs[key])], tasks=list(self.tasks), memory=list(run.modes),
                           limit=self.opts.eval_limit, batch_size=self.opts.eval_batch_size, out=str(out),
                           include_path=str(self.corpus_dir / "tasks"), bucket_source="recorded",
                           max_gen_toks=16)
        t0 = time.perf_counter()
        report = run_eval(opts, Console(quiet=True))
        entry["eval_seconds"] = round(time.perf_counter() - t0, 1)
        entry["eval"] = summarize_model(report["models"][0])
        self.reports.append(report)
        _free_memory()

    def prompt_routing(self, key: str) -> None:
        """How often a fact's evaluation prompt is routed to the same node as the majority of its training
        documents, per level: the paper's premise that a question fetches the memory its facts were stored in."""
        from collections import Counter

        from ..export import load_model_dir

        loaded = load_model_dir(self.model_dirs[key], device="cpu", verify=False)
        facts = json.loads((self.corpus_dir / "facts_meta.json").read_text())["facts"]
        seen = [f for f in facts if f["repeat_count"] > 0]
        by_entity: dict[str, Counter] = {}
        with open(self.index_dir / "documents.jsonl", encoding="utf-8") as fh:
            for line in fh:
                d = json.loads(line)
                if d["id"].startswith("fact/"):
                    entity = d["id"][len("fact/"):].rsplit("/", 1)[0]
                    by_entity.setdefault(entity, Counter())[tuple(d["path"])] += 1
        prompts = [_prompt(f) for f in seen]
        paths = loaded.route(prompts).tolist()
        levels = len(paths[0]) if paths else 0
        hits = [0] * levels
        for f, p in zip(seen, paths):
            majority = by_entity[f["entity_key"]].most_common(1)[0][0]
            for lvl in range(levels):
                hits[lvl] += int(tuple(p[:lvl + 1]) == majority[:lvl + 1])
        self.summary["prompt_routing"] = {"facts": len(seen), "template": "paper-style (eval template 0)",
                                          "same_node_by_level": [h / max(len(seen), 1) for h in hits]}


def _prompt(fact: dict) -> str:
    from ..data.demo_corpus import DEMO_RELATIONS

    return DEMO_RELATIONS[fact["relation"]].eval_templates[0].split("{answer}")[0].rstrip().format(
        name=fact["entity"])


def _fact_tasks(tasks: Sequence[str], qa: bool) -> list[str]:
    base = [t for t in tasks if t.startswith("demo_") and "heldout" not in t and not t.endswith("_qa")]
    return base + ([f"{t}_qa" for t in base] if qa else [])


def _vocab(index_meta: dict) -> int:
    from ..data.tokenizer import padded_vocab_size

    return padded_vocab_size(index_meta["tokenizer"]["vocab_size"])


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _device() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _versions() -> dict[str, str]:
    from ..utils import versions

    out = versions()
    for dist in ("lm_eval", "datasets"):
        try:
            from importlib import metadata

            out[dist] = metadata.version(dist)
        except Exception:
            out[dist] = "not installed"
    return out


# ---------------------------------------------------------------- summaries

def pooled_buckets(tasks: dict[str, dict]) -> dict[str, dict[str, float | int | None]]:
    """Accuracy per bucket over every fact task of one mode, weighted by items."""
    out = {}
    for label in BUCKET_LABELS:
        n = correct = 0
        for r in tasks.values():
            b = (r.get("buckets") or {}).get(label)
            if b and b["n"]:
                n += b["n"]
                correct += b["acc"] * b["n"]
        out[label] = {"n": n, "acc": correct / n if n else None}
    return out


def summarize_model(model: dict) -> dict[str, dict]:
    """Per mode: held-out perplexity (index validation split), Avg-SK / Avg-CK, pooled bucket accuracy, per-task
    accuracy, and the held-out text's word perplexity."""
    ppl = (model.get("perplexity") or {}).get("overall", {})
    out = {}
    for mode, m in model["modes"].items():
        facts = {t: r for t, r in m["tasks"].items() if r.get("buckets")}
        word_ppl = next((r["metrics"].get("word_perplexity") for t, r in m["tasks"].items()
                         if t.endswith("heldout_ppl")), None)
        lastword = next((r["value"] for t, r in m["tasks"].items() if t.endswith("heldout_lastword")), None)
        out[mode] = {"heldout_ppl": ppl.get(mode), "avg_sk": m["averages"]["SK"], "avg_ck": m["averages"]["CK"],
                     "lastword_acc": lastword, "heldout_word_ppl": word_ppl, "buckets": pooled_buckets(facts),
                     "tasks": {t: r["value"] for t, r in facts.items()}}
    return out


def curves(summaries: Sequence[dict]) -> list[dict]:
    """One curve per (run, mode of interest) over all summaries (seeds): per bucket the accuracies of every seed."""
    lines: dict[tuple[str, str], dict[str, list[float]]] = {}
    for s in summaries:
        for key, r in s["runs"].items():
            if r.get("status") != "ok" or "eval" not in r:
                continue
            modes = [r["headline"]] + (["generic"] if key == "S+mem" and "generic" in r["eval"] else [])
            for mode in modes:
                acc = r["eval"][mode]["buckets"]
                line = lines.setdefault((key, mode), {b: [] for b in BUCKET_LABELS})
                for b in BUCKET_LABELS:
                    if acc[b]["acc"] is not None:
                        line[b].append(acc[b]["acc"])
    return [{"run": k, "mode": m, "label": f"{k} ({m})" if m != "none" else k, "buckets": v}
            for (k, m), v in lines.items()]


def plot_fig1(summaries: Sequence[dict], path: Path, title: str) -> None:
    """Accuracy (%) against training frequency of the fact, one line per run (mean over seeds, min-max bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=130)
    x = list(range(len(BUCKET_LABELS)))
    for c in curves(summaries):
        ys = [100 * sum(v) / len(v) if v else math.nan for v in c["buckets"].values()]
        lo = [100 * min(v) if v else math.nan for v in c["buckets"].values()]
        hi = [100 * max(v) if v else math.nan for v in c["buckets"].values()]
        err = [[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]]
        style = "--" if c["mode"] == "generic" else "-"
        ax.errorbar(x, ys, yerr=err, marker="o", linestyle=style, capsize=3, label=c["label"])
    ax.set_xticks(x, ["0", "1–9", "10–99", "100–999", "≥1000"])
    ax.set_xlabel("times the fact was stated in training (its bucket)")
    ax.set_ylabel("accuracy on held-out templates (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from ..utils import atomic_write_path

    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def markdown_table(summaries: Sequence[dict]) -> str:
    """The results table of docs/results.md: per run and mode, mean over seeds (seeds in brackets)."""
    rows: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    for s in summaries:
        for key, r in s["runs"].items():
            for mode, e in (r.get("eval") or {}).items():
                rows.setdefault((key, mode), []).append((r, e))

    def mean(vals: list) -> str:
        vals = [v for v in vals if v is not None]
        return "-" if not vals else f"{sum(vals) / len(vals):.2f}"

    def pct(vals: list) -> str:
        vals = [v for v in vals if v is not None]
        return "-" if not vals else f"{100 * sum(vals) / len(vals):.1f}"

    head = ("| run | memory | seeds | inference params (anchor + fetched) | bank | tokens | train s | held-out ppl "
            "| text word ppl | Avg-SK | Avg-CK (last word) | " + " | ".join(BUCKET_LABELS) + " |")
    lines = [head, "|" + " --- |" * (11 + len(BUCKET_LABELS))]
    for (key, mode), pairs in rows.items():
        r0 = pairs[0][0]
        p = r0["params"]
        inference = p["anchor"] + (p["fetched"] if mode in ("fetched", "generic") else 0)
        lines.append(
            f"| {key} | {mode} | {len(pairs)} | {_count(inference)} | {_count(p['bank'])} | "
            f"{_count(r0['tokens'])} | {mean([r.get('train_seconds') for r, _ in pairs])} | "
            f"{mean([e['heldout_ppl'] for _, e in pairs])} | {mean([e['heldout_word_ppl'] for _, e in pairs])} | "
            f"{pct([e['avg_sk'] for _, e in pairs])} | {pct([e['avg_ck'] for _, e in pairs])} | "
            + " | ".join(pct([e["buckets"][b]["acc"] for _, e in pairs]) for b in BUCKET_LABELS) + " |")
    return "\n".join(lines) + "\n"


def _count(n: int) -> str:
    """8,921,344 -> 8.92M; 43,296 -> 43.3k."""
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


# ---------------------------------------------------------------- driver

def run_part(opts: Options) -> dict:
    """Run one part end to end (see the module docstring); returns the summary. Each run is evaluated right after it
    is trained and the table and plot are rewritten, so a call cut off by its wall-time limit still leaves every
    finished run's results."""
    opts.out.mkdir(parents=True, exist_ok=True)
    part = Part(opts)
    part.save()
    part.step("expand demo corpus", part.expand)
    part.step("index", part.index)
    title = f"part {opts.part}, seed {part.seed} ({part.summary['device']})"
    for key in part.runs:
        trained = _guarded(part, key, f"train {key}", lambda k=key: part.train(k))
        if not trained or part.summary["runs"][key].get("status") != "ok":
            continue
        if key == "S+mem":
            try:
                part.step("prompt routing", lambda: part.prompt_routing("S+mem"))
            except Exception as exc:
                part.summary["prompt_routing"] = {"error": f"{type(exc).__name__}: {exc}"}
        if _guarded(part, key, f"eval {key}", lambda k=key: part.evaluate(k), field="eval_error"):
            write_outputs([part.summary], opts.out, title=title)
            _write_reports(part.reports, opts.out / "eval_reports.json.xz")
    part.save()
    opts.log(f"[{elapsed(opts):6.1f} s] done: {opts.out / 'summary.json'}")
    return part.summary


def _guarded(part: Part, key: str, name: str, fn: Callable[[], Any], field: str = "status") -> bool:
    """Run one step of run `key`; a failure is recorded in its summary entry (one failed run must not cost the
    others). Returns whether the step finished."""
    try:
        part.step(name, fn)
        return True
    except Exception as exc:
        entry = part.summary["runs"].setdefault(key, {})
        entry[field] = f"failed: {type(exc).__name__}: {exc}" if field == "status" else f"{type(exc).__name__}: {exc}"
        entry["traceback"] = traceback.format_exc()[-4000:]
        part.opts.log(f"  {name}: FAILED {type(exc).__name__}: {exc}")
        part.save()
        return False


def write_outputs(summaries: Sequence[dict], out: Path, title: str) -> None:
    """table.md and the Fig.-1 plot, each replaced atomically (a call cut off mid-write keeps the previous one)."""
    from ..utils import atomic_write_path

    if any("eval" in r for s in summaries for r in s["runs"].values()):
        plot_fig1(summaries, out / "fig1_accuracy_by_frequency.png", title)
        with atomic_write_path(out / "table.md") as tmp:
            tmp.write_text(markdown_table(summaries), encoding="utf-8")


def _write_reports(reports: list[dict], path: Path) -> None:
    import lzma

    from ..utils import atomic_write_path

    with atomic_write_path(path) as tmp:
        tmp.write_bytes(lzma.compress(json.dumps(reports, default=str).encode(), preset=6))


def merge(summary_files: Sequence[Path], out: Path) -> dict:
    """Combine the summaries of several parts (seeds) into merged.json, table.md and the Fig.-1 plot."""
    summaries = [json.loads(Path(f).read_text(encoding="utf-8")) for f in summary_files]
    out.mkdir(parents=True, exist_ok=True)
    devices = sorted({s["device"] for s in summaries})
    write_outputs(summaries, out, title=f"{len(summaries)} parts, seeds "
                                        f"{sorted({s['seed'] for s in summaries})} ({', '.join(devices)})")
    merged = {"parts": summaries, "curves": curves(summaries)}
    (out / "merged.json").write_text(json.dumps(merged, indent=1), encoding="utf-8")
    return merged

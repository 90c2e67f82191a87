#!/usr/bin/env python3
"""The small-scale reproduction (issue 12) on the GPU machine, or its tiny CPU twin; see docs/results.md.

    python benchmarks/gpu_repro.py --out OUT --part 1|2|all [options]      # usually via benchmarks/gpu_repro.sh
    python benchmarks/gpu_repro.py merge OUT1/summary.json OUT2/summary.json --out DIR

Before hmlm is imported: the repository goes first on sys.path, `--site` (packages carried as an unpacked folder)
goes LAST, so carried packages only fill what the machine's image lacks and never shadow its own versions; and
where hmlm is not pip-installed, its entry points (the plugin registry) are declared from pyproject.toml in a
temporary dist-info, exactly as an install would.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_dist_info(dest: Path) -> Path:
    """A minimal hmlm-<version>.dist-info under `dest` declaring pyproject.toml's entry points (what an install
    would write), so that the plugin registry finds hmlm's built-ins in a plain checkout."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    meta = Path(dest) / f"hmlm-{project['version']}.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: hmlm\nVersion: {project['version']}\n")
    lines = []
    for group, entries in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in entries.items()]
        lines.append("")
    (meta / "entry_points.txt").write_text("\n".join(lines))
    return meta


def bootstrap(site: Path | None) -> None:
    sys.path.insert(0, str(REPO))
    if site is not None and site.is_dir():
        sys.path.append(str(site))
    try:
        if any(ep.group == "hmlm.embedders" for ep in md.distribution("hmlm").entry_points):
            return
    except md.PackageNotFoundError:
        pass
    sys.path.append(str(write_dist_info(Path(tempfile.mkdtemp(prefix="hmlm-meta-"))).parent))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        p = argparse.ArgumentParser(prog="gpu_repro.py merge")
        p.add_argument("summaries", nargs="+", type=Path)
        p.add_argument("--out", type=Path, required=True)
        a = p.parse_args(argv[1:])
        bootstrap(None)
        from hmlm.bench.repro import merge

        merge(a.summaries, a.out)
        print((a.out / "table.md").read_text(encoding="utf-8"))
        return 0
    p = argparse.ArgumentParser(prog="gpu_repro.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="summary.json, table.md, the plot, eval reports")
    p.add_argument("--part", default="1", choices=("1", "2", "all"), help="1: seed 0 of S, S+mem, 2S, S+generic; "
                   "2: seed 1 of S, S+mem, 2S and the frozen-anchor run; all: every run, one seed")
    p.add_argument("--seed", type=int, default=None, help="override the part's seed")
    p.add_argument("--runs", default=None, help="comma-separated subset/order of runs (S, 2S, S+mem, S+generic, "
                   "S->mem frozen)")
    p.add_argument("--tiny", action="store_true", help="the CPU twins (recipes/demo/tiny)")
    p.add_argument("--recipes", type=Path, default=REPO / "recipes" / "demo")
    p.add_argument("--demo", type=Path, default=REPO / ".repro" / "demo", help="folder from hmlm data build-demo")
    p.add_argument("--embedder-path", default=None, help="index.embedder.path (a copy from hmlm embedder export)")
    p.add_argument("--site", type=Path, default=None, help="unpacked carried packages (appended to sys.path)")
    p.add_argument("--work", type=Path, default=Path("runs/repro"), help="corpus, index, runs, eval reports")
    p.add_argument("--facts-per-relation", type=int, default=250)
    p.add_argument("--text-mb", type=float, default=None, help="use at most this much of the demo's real text")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs of the index per run (1: a fact with "
                   "count c is seen c times)")
    p.add_argument("--budget-s", type=float, default=520.0, help="start no run that would end (with its eval) "
                   "later than this many seconds after start (a GPU call may run 600 s in all)")
    p.add_argument("--eval-s-per-model", type=float, default=30.0, help="eval time reserved per model")
    p.add_argument("--eval-limit", type=int, default=None, help="items per eval task (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--qa", action="store_true", help="also evaluate the question templates")
    p.add_argument("--compile", action="store_true", help="trainer.compile=true")
    p.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. trainer.batch_size=32")
    a = p.parse_args(argv)
    bootstrap(a.site)
    from hmlm.bench.repro import Options, run_part

    runs = tuple(r.strip() for r in a.runs.split(",")) if a.runs else None
    opts = Options(out=a.out, part=a.part, seed=a.seed, runs=runs, recipes=a.recipes, tiny=a.tiny, demo=a.demo,
                   embedder_path=a.embedder_path, work=a.work, facts_per_relation=a.facts_per_relation,
                   text_mb=a.text_mb, epochs=a.epochs, budget_s=a.budget_s, eval_s_per_model=a.eval_s_per_model,
                   eval_limit=a.eval_limit, eval_batch_size=a.eval_batch_size, qa=a.qa, compile=a.compile,
                   overrides=tuple(a.overrides), log=lambda msg: print(msg, flush=True))
    summary = run_part(opts)
    bad = {k: r.get("status") for k, r in summary["runs"].items() if r.get("status") != "ok" or "eval_error" in r}
    if bad:
        print(f"not ok: {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

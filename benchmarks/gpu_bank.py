"""The bank-at-scale rows of issue 9 (docs/benchmarks.md) in one process, within a wall-time budget.

Rows, in this order (the most telling first, so a budget that runs out drops the least):
  1. the anchor alone at each batch size (the baseline of every ratio, measured in this run);
  2. anchor + memory for each tier plan (`--plans`, ';'-separated `TIERS[@OPTIM_STATE][+KEY=VALUE...]`, TIERS `zero3`
     for the DeepSpeed ZeRO-3 baseline store; benchmarks/gpu_bank_ds.sh uses the overrides): the model and bank are built
     once per plan and timed at each batch size (`hmlm.bench.train_step.measure_batches`);
  3. `hmlm bench bank-io` of the bank with `--bankio-tiers` (init, export, load, checkpoint save and load).

Before each plan the driver compares the time left with what the plan is expected to take (PRIOR_S, scaled by how
slow the rows so far ran against their priors, plus the bank-io row it keeps time for); a plan that does not fit is
skipped with the reason. A row still running when the budget ends is stopped (SIGALRM) and marked as such. After every
row the results are rewritten: OUT/bank_rows.json (every row) and OUT/bank.md (the tables for docs/benchmarks.md), so
a hard kill still leaves what was measured.

    python benchmarks/gpu_bank.py --out OUT [--budget-s 235] [--disk-dir DIR]   # the paper-like shape (GPU)
    python benchmarks/gpu_bank.py --out OUT --dry-run                           # the rows, sizes and estimates
    python benchmarks/gpu_bank.py --out OUT --tiny                              # every row at CPU size (tests)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python benchmarks/gpu_bank.py` imports this checkout's hmlm (its entry points: pip -e)
RECIPE = REPO / "recipes" / "quickstart.yaml"

# 160M anchor, memory (256,64,16,0), k=16 over 4 levels: 4.62B bank parameters in bf16, 18.1M fetched per sequence
PAPER = ["anchor.options.preset=160m", "anchor.vocab_size=50432", "index.router.branching=16", "index.router.levels=4",
         "memory.sizes=[256,64,16,0]", "memory.dtype=bfloat16", "data.seq_len=2048", "memory.io_threads=16"]
TINY = ["anchor.options.preset=tiny", "anchor.options.n_layers=2", "anchor.options.d_model=32", "anchor.options.n_heads=2", "anchor.options.head_dim=16",
        "anchor.options.ffn_dim=64", "anchor.vocab_size=128", "index.router.branching=4", "index.router.levels=3",
        "memory.sizes=[8,4,2]", "memory.dtype=bfloat16", "data.seq_len=16", "memory.io_threads=2"]
# device: bank + bf16 moments (28 GB) beside the anchor; mixed: the deepest level (and its moments) in host RAM;
# host; disk with bf16 moments (a 28 GB sparse file, within the 64 GB disk); device with fp32 moments last: 46 GB,
# which the issue measured out of memory at batch 8 (a row that says so) and 62.9 GiB at batch 4
PLANS = "device@bf16;device,device,host;host;disk@bf16;device@fp32"
# seconds a row needs on a warm H100 (model build, bank fill, warm-up and timed steps at both batch sizes); the
# driver rescales them by how the finished rows compared with their priors
PRIOR_S = {"anchor": 10.0, "device": 20.0, "host": 35.0, "disk": 60.0, "bank-io": 50.0, "zero3": 120.0}


class BudgetSpent(BaseException):
    """Raised by SIGALRM inside a row when the wall-time budget ends (BaseException: no `except Exception` eats it)."""


def parse_plan(spec: str) -> tuple[str, str | None, list[str]]:
    """`TIERS[@OPTIM_STATE][+KEY=VALUE...]` -> (tiers, optimizer state, recipe overrides of this plan only), e.g.
    `disk@bf16+memory.disk_io=aio`; TIERS `zero3` is the zero3 store (the bank under DeepSpeed ZeRO-3)."""
    head, *extra = spec.split("+")
    tiers, _, state = head.partition("@")
    return tiers, state or None, extra


def plan_recipe(base: list[str], spec: str, levels: int, disk: Path | None = None):
    """(label, store, recipe, prior seconds) of one plan; `base` are the run's recipe overrides."""
    from dataclasses import replace

    from hmlm.bench.train_step import tiered
    from hmlm.config import load_recipe

    tiers, optim, extra = parse_plan(spec)
    recipe = load_recipe(RECIPE, base + extra)
    if tiers == "zero3":
        r, store, prior = replace(recipe, memory=replace(recipe.memory, store="zero3")), "zero3", PRIOR_S["zero3"]
    else:
        r, store = tiered(recipe, tiers), "tiered"
        prior = (max(PRIOR_S.get(t, PRIOR_S["disk"]) for t in plan_tiers_of(tiers, levels)) if tiers != "auto"
                 else PRIOR_S["host"])
    memory = replace(r.memory, optim_state=optim or r.memory.optim_state)
    if disk is not None:
        memory = replace(memory, disk_dir=str(disk / spec.replace(",", "-").replace("@", "-").replace("+", "-")
                                              .replace("=", "-")))
    label = f"anchor + memory, tiers {tiers}" + "".join(f" {o}" for o in extra)
    return label, store, replace(r, memory=memory), prior


def plan_tiers_of(tiers: str, levels: int) -> list[str]:
    parts = tiers.split(",")
    return parts if len(parts) > 1 else parts * levels


class Budget:
    def __init__(self, seconds: float, scale: float, start: float):
        self.start, self.seconds, self.scale = start, seconds, scale
        self.spent_prior = self.spent_real = 0.0

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def estimate(self, prior: float) -> float:
        speed = max(1.0, self.spent_real / self.spent_prior) if self.spent_prior else 1.0
        return prior * self.scale * speed

    def done(self, prior: float, seconds: float) -> None:
        self.spent_prior += prior * self.scale
        self.spent_real += seconds


def _alarm(_signum, _frame):
    raise BudgetSpent


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], io_rows: list[dict[str, Any]]) -> str:
    gib = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [f"### Bank at scale (issue 9): {meta['shape']} — {meta['date']}, {meta['device']}", "",
             "```", meta["command"], "```", "",
             f"Sequences of {meta['seq_len']} tokens; {meta['bank_params']:,} bank parameters "
             f"({meta['memory_dtype']}), {meta['fetched_params']:,} fetched per sequence; {meta['steps']} timed steps "
             f"after {meta['warmup']} warm-up steps per row; ratio = tokens/s against the anchor alone at the same "
             "batch, measured in this run.", "",
             "| batch | config | optimizer state | step ms | tokens/s | ratio vs anchor | peak GPU GiB | MFU "
             "| host RSS GiB | bank by tier (values + moments) |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        note = r.get("error") or r.get("skipped")
        ops = ", ".join(f"{k}={r[k]}" for k in ("disk_io", "host_update", "host_read") if r.get(k))
        r = {**r, "config": r["config"] + (f" [{ops}]" if ops else "")}
        tiers = ", ".join(f"{t} {(v['param_bytes'] + v['state_bytes']) / 1e9:.1f} GB"
                          for t, v in sorted((r.get("bank_bytes_by_tier") or {}).items()))
        if note:
            lines.append(f"| {r['batch']} | {r['config']} | {r.get('optim_state') or ''} | {note} | | | | | | |")
            continue
        mfu = "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        ratio = "" if r.get("ratio_vs_anchor") is None else f"{r['ratio_vs_anchor']:.3f}"
        lines.append(f"| {r['batch']} | {r['config']} | {r.get('optim_state') or ''} | {r['step_ms']:.1f} "
                     f"| {r['tokens_per_s']:,.0f} | {ratio} | {gib(r.get('peak_mem_gib'))} | {mfu} "
                     f"| {gib(r.get('host_rss_gib'))} | {tiers} |")
    if io_rows:
        cols = ("init", "export", "load", "checkpoint_save", "checkpoint_load")
        lines += ["", "Bank I/O (`hmlm bench bank-io`): seconds (GB/s of bank values)", "",
                  "| tiers | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
                  "| --- |" + " ---: |" * len(cols)]
        for r in io_rows:
            if r.get("error") or r.get("skipped"):
                lines.append(f"| {r.get('tiers') or r.get('plan')} | {r.get('error') or r.get('skipped')} |"
                             + " |" * (len(cols) - 1))
            else:
                lines.append(f"| {r['tiers']} | " + " | ".join(f"{r[c + '_s']:.2f} ({r[c + '_gb_per_s']})"
                                                               for c in cols) + " |")
    if meta.get("notes"):
        lines += [""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"


def write(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]], io_rows: list[dict[str, Any]]) -> None:
    from hmlm.utils import atomic_write_path, write_json

    write_json(out / "bank_rows.json", {"meta": meta, "train": rows, "bank_io": io_rows})
    with atomic_write_path(out / "bank.md") as tmp:
        tmp.write_text(markdown(meta, rows, io_rows), encoding="utf-8")


def dry_run(recipe, base: list[str], plans: list[str], batches: list[int], vocab: int, budget: Budget) -> None:
    from hmlm.model import size_report

    print(f"budget {budget.seconds:.0f} s; batches {batches}; seq_len {recipe.data.seq_len}")
    print(f"row anchor alone: ~{budget.estimate(PRIOR_S['anchor']):.0f} s")
    levels = sum(1 for s in recipe.memory.sizes if s)
    for spec in plans:
        _, _, r, _ = plan_recipe(base, spec, levels)
        rep = size_report(r, vocab)
        by_tier: dict[str, float] = {}
        for lvl in rep["bank_levels"]:
            by_tier[lvl["tier"]] = by_tier.get(lvl["tier"], 0) + (lvl["bytes"] + lvl["state_bytes"]) / 1e9
        prior = max(PRIOR_S.get(t, PRIOR_S["zero3"]) for t in by_tier)
        print(f"row {spec}: bank {rep['bank_params']:,} parameters, fetched {rep['fetched_params_per_sequence']:,}; "
              + ", ".join(f"{t} {gb:.1f} GB" for t, gb in by_tier.items())
              + f" (values + {r.memory.optim_state} moments); ~{budget.estimate(prior):.0f} s")
    print(f"row bank-io: ~{budget.estimate(PRIOR_S['bank-io']):.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="bank_rows.json and bank.md go here")
    ap.add_argument("--budget-s", type=float, default=235.0, help="wall-time budget of this process")
    ap.add_argument("--disk-dir", type=Path, default=None,
                    help="disk-tier level files and bank-io scratch, removed after each row (default: a folder in "
                         "$TMPDIR; keep it off OUT, whose files are copied back)")
    ap.add_argument("--plans", default=PLANS, help="';'-separated tier plans TIERS[@OPTIM_STATE][+KEY=VALUE...] "
                    "(TIERS zero3: the bank under DeepSpeed ZeRO-3)")
    ap.add_argument("--batches", default="8,4")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--bankio-tiers", default="auto", help="tier plan of the bank-io row ('' = no bank-io row)")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="profile each row after its timing (hmlm bench train --profile): tables in DIR")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: every row in seconds (tests)")
    ap.add_argument("--dry-run", action="store_true", help="print the rows, bank bytes per tier and estimates")
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides")
    args = ap.parse_args(argv)
    start = time.monotonic()  # the budget counts importing torch and hmlm, which happens below

    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from hmlm.bench.bank_io import measure_bank_io
    from hmlm.bench.train_step import add_ratios, measure_batches
    from hmlm.config import load_recipe
    from hmlm.index import vocab_size_for

    shape = TINY if args.tiny else PAPER
    base = shape + list(args.overrides)
    recipe = load_recipe(RECIPE, base)
    vocab = vocab_size_for(recipe)
    plans = [p for p in args.plans.split(";") if p]
    batches = [int(b) for b in args.batches.split(",") if b]
    budget = Budget(args.budget_s, 0.01 if args.tiny else 1.0, start)
    if args.dry_run:
        dry_run(recipe, base, plans, batches, vocab, budget)
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    disk = args.disk_dir or Path(tempfile.gettempdir()) / "hmlm-gpu-bank"
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/gpu_bank.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta: dict[str, Any] = {
        "shape": "tiny (CPU test)" if args.tiny else (
            f"{str(recipe.anchor.options.get('preset', recipe.anchor.name)).upper()} anchor, memory ({','.join(map(str, recipe.memory.sizes))}), "
            f"k={recipe.index.router.branching}"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "command": cmd, "seq_len": recipe.data.seq_len, "memory_dtype": recipe.memory.dtype,
        "steps": args.steps, "warmup": args.warmup, "budget_s": args.budget_s, "bank_params": 0,
        "fetched_params": 0, "notes": []}
    rows: list[dict[str, Any]] = []
    io_rows: list[dict[str, Any]] = []
    reserve = budget.estimate(PRIOR_S["bank-io"]) if args.bankio_tiers else 0.0
    levels = sum(1 for s in recipe.memory.sizes if s)
    # (label, store, recipe, prior) per group of rows; the anchor's baseline first
    groups: list[tuple[str, str | None, Any, float]] = [("anchor alone", None, recipe, PRIOR_S["anchor"])]
    for spec in plans:
        groups.append(plan_recipe(base, spec, levels, disk))
    state = {"stopped": False}

    def not_run(why: str) -> dict[str, Any]:
        return {"skipped": why} if why.startswith(("skipped", "stopped")) else {"error": why}

    def attempt(prior: float, extra: float, fn):
        """fn()'s result, or the reason it was not run (budget left, budget spent while running, or its error)."""
        need = budget.estimate(prior)
        if state["stopped"] or budget.left() < need + extra:
            return f"skipped: {max(budget.left(), 0):.0f} s of the budget left, the row needs ~{need + extra:.0f} s"
        t0 = time.monotonic()
        try:
            # the alarm interrupts only a row, so the bookkeeping between rows always completes
            signal.setitimer(signal.ITIMER_REAL, max(budget.left(), 0.001))
            try:
                return fn()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except BudgetSpent:
            state["stopped"] = True
            return f"stopped by the {args.budget_s:.0f} s budget"
        except Exception as exc:  # e.g. a plan with no room on this disk: say so and go on
            return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        finally:
            budget.done(prior, time.monotonic() - t0)

    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for label, store, r, prior in groups:
            try:
                got = attempt(prior, 0.0 if store is None else reserve,
                              lambda: measure_batches(r, vocab_size=vocab, store=store, steps=args.steps,
                                                      warmup=args.warmup, device=device, batches=batches,
                                                      profile=args.profile))
            finally:
                if store is not None:  # the plan's level files: the next plan needs the disk space
                    shutil.rmtree(Path(r.memory.disk_dir), ignore_errors=True)
            if isinstance(got, str):
                got = [{"config": label, "store": store, "batch": b, **not_run(got),
                        "optim_state": r.memory.optim_state if store else None} for b in batches]
            rows += got
            for row in got:
                meta["bank_params"] = max(meta["bank_params"], row.get("bank_params") or 0)
                meta["fetched_params"] = max(meta["fetched_params"], row.get("fetched_params") or 0)
            add_ratios(rows, device)
            write(args.out, meta, rows, io_rows)
        for spec in [t for t in args.bankio_tiers.split(";") if t]:
            got = attempt(PRIOR_S["bank-io"], 0.0,
                          lambda: measure_bank_io(recipe, vocab_size=vocab, tiers=spec, workdir=disk / "bankio",
                                                  device=device))
            io_rows.append({"plan": spec, **not_run(got)} if isinstance(got, str) else got)
            write(args.out, meta, rows, io_rows)
    finally:
        signal.signal(signal.SIGALRM, previous)
    if any(r.get("skipped") for r in rows + io_rows) or state["stopped"]:
        meta["notes"].append(f"the {args.budget_s:.0f} s budget ran out: rows marked skipped/stopped were not "
                             "measured")
    meta["wall_s"] = round(time.monotonic() - budget.start, 1)
    meta["notes"].append(f"wall time {meta['wall_s']:.0f} s of the {args.budget_s:.0f} s budget (process start "
                         "to the last row)")
    add_ratios(rows, device)
    write(args.out, meta, rows, io_rows)
    print(markdown(meta, rows, io_rows))
    shutil.rmtree(disk, ignore_errors=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # a row stopped by the budget may leave I/O threads behind: do not wait for them

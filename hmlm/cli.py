"""The `hmlm` command: index, fit, plugins (and the commands later issues add: eval, generate, bench).

Every user error (bad recipe, missing file, unknown plugin, corrupt artifact) exits with code 2 and a one-paragraph
message naming the file and key; tracebacks are for bugs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. trainer.max_steps=50")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="index the corpus if needed, then train (anchor and/or memory)")
    _recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoints/last.ckpt")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model on the meta device, print parameter counts, exit")

    p = sub.add_parser("index", help="embed, cluster, tokenize and pack a corpus")
    _recipe_args(p)
    p.add_argument("--rebuild", action="store_true", help="rebuild even if the index directory exists")

    sub.add_parser("plugins", help="list installed anchors, memories, routers, embedders and stores")

    p = sub.add_parser("eval", help="lm-eval tasks per memory mode and training-frequency bucket; JSON + plots")
    p.add_argument("--model", action="append", required=True, metavar="DIR", help="model directory (repeatable)")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks or tags (default: the hmlm "
                   "fact tasks and hmlm_heldout_lastword; see evals/tasks)")
    p.add_argument("--memory", default="fetched,generic,none",
                   help="comma-separated modes: fetched, generic, none, blocked:<level>:<node>")
    p.add_argument("--limit", type=int, default=None, help="at most this many items per task")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default=None, help="output folder (default: <first model dir>/../eval)")
    p.add_argument("--buckets", default="0,1,10,100,1000", help="lower edges of the frequency buckets")
    p.add_argument("--bucket-source", default="auto", choices=("auto", "recorded", "corpus"),
                   help="recorded repeat counts of injected facts, or entity counts in the training corpus")
    p.add_argument("--ambiguous", default="", help="extra comma-separated words to flag as ambiguous entities")
    p.add_argument("--include-path", default=None, help="task folder (default: evals/tasks)")
    p.add_argument("--max-gen-toks", type=int, default=32)
    p.add_argument("--no-perplexity", action="store_true", help="skip held-out perplexity per leaf")

    p = sub.add_parser("bench", help="benchmarks (results go to stdout and --out; see docs/benchmarks.md)")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("train", help="training-step throughput and MFU, anchor alone vs with memory")
    _recipe_args(b)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--stores", default="device,host", help="bank stores to measure besides the anchor baseline")
    b.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    b.add_argument("--compile", action="store_true", help="torch.compile the training step (trainer.compile)")
    b = bench.add_parser("fit-overhead", help="tokens/s of `hmlm fit` (Lightning, data, logging, checkpoints) vs "
                                              "the bench's training step at the same shape")
    _recipe_args(b)
    b.add_argument("--steps", type=int, default=50)
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    b.add_argument("--compile", action="store_true", help="torch.compile the training step (trainer.compile)")
    b = bench.add_parser("scaling", help="data-parallel throughput on 1..N devices: subtree-affine vs DDP of the bank")
    _recipe_args(b)
    b.add_argument("--devices", default="1,2", help="world sizes to measure, e.g. 1,2,4,8")
    b.add_argument("--modes", default="subtree,replicated")
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    b = bench.add_parser("memory-types", help="train every memory type at equal fetched size, then evaluate all")
    _recipe_args(b)
    b.add_argument("--types", default="ffn,lora-qk,lora-vo,lora-ffn,kv")
    b.add_argument("--out-dir", type=Path, default=Path("runs/memory-types"))
    b.add_argument("--tasks", default=None, help="comma-separated eval tasks (default: hmlm eval's default set)")
    b.add_argument("--limit", type=int, default=None, help="items per task")
    return parser


def _load(args):
    from .config import load_recipe

    return load_recipe(args.recipe, args.overrides)


def dry_run(recipe) -> None:
    from .model import size_report

    vocab = _vocab_for(recipe)
    rep = size_report(recipe, vocab)
    print(f"vocab size: {vocab}")
    print(f"anchor parameters: {rep['anchor_params']}")
    print(f"fetched memory parameters per sequence: {rep['fetched_params_per_sequence']}")
    print(f"bank parameters: {rep['bank_params']}")
    print(f"generic memory parameters: {rep['generic_params']}")
    tiers: dict[str, int] = {}
    for lvl in rep["bank_levels"]:
        print(f"bank level {lvl['level']}: r={lvl['r']} nodes={lvl['nodes']} parameters={lvl['params']} "
              f"bytes={lvl['bytes']} tier={lvl['tier']}")
        tiers[lvl["tier"]] = tiers.get(lvl["tier"], 0) + lvl["bytes"]
    for tier, nbytes in tiers.items():
        print(f"bank bytes ({tier}): {nbytes}")


def _vocab_for(recipe) -> int:
    from .data.tokenizer import padded_vocab_size

    if recipe.anchor.vocab_size:
        return recipe.anchor.vocab_size
    meta = Path(recipe.index.dir) / "index.json"
    if meta.is_file():
        import json

        return padded_vocab_size(json.loads(meta.read_text())["tokenizer"]["vocab_size"])
    if recipe.data.tokenizer.kind == "gpt2":
        return padded_vocab_size(50258)  # GPT-2's 50,257 + our pad token
    return padded_vocab_size(recipe.data.tokenizer.vocab_size)


def _bench(args, recipe) -> int:
    from rich.table import Table

    if args.bench == "scaling":
        from .bench.scaling import run_scaling

        rows = run_scaling(recipe, vocab_size=_vocab_for(recipe), worlds=[int(d) for d in args.devices.split(",")],
                           modes=[m for m in args.modes.split(",") if m], steps=args.steps, warmup=args.warmup,
                           out=args.out)
        table = Table(title=f"data-parallel training step, {rows[0]['device']}, "
                            f"{rows[0]['batch_per_rank']} x {rows[0]['seq_len']} tokens per rank")
        cols = ("mode", "world", "step_ms", "tokens_per_s", "scaling_efficiency", "anchor_bytes_per_step",
                "bank_bytes_per_step", "bank_params_per_rank")
        for col in cols:
            table.add_column(col, justify="left" if col == "mode" else "right")
        for r in rows:
            table.add_row(*(str(r[c]) for c in cols))
        console.print(table)
        return 0
    if args.bench == "memory-types":
        from .bench.memory_types import run as run_types
        from .eval.tasks import DEFAULT_TASKS

        tasks = [t for t in (args.tasks or "").split(",") if t] or list(DEFAULT_TASKS)
        run_types(recipe, vocab_size=_vocab_for(recipe), types=[t for t in args.types.split(",") if t],
                  out_dir=args.out_dir, tasks=tasks, limit=args.limit, console=console)
        return 0

    if args.bench == "fit-overhead":
        from .bench.fit_overhead import run_fit_overhead

        rows = run_fit_overhead(recipe, vocab_size=_vocab_for(recipe), steps=args.steps, warmup=args.warmup,
                                compile=args.compile, out=args.out)
        table = Table(title=f"fit vs bench, {rows[0]['device']}, batch {rows[0]['batch']} x {rows[0]['seq_len']}")
        for col in ("config", "step_ms", "tokens_per_s", "ratio_vs_bench"):
            table.add_column(col, justify="left" if col == "config" else "right")
        for r in rows:
            table.add_row(*(str(r[c]) for c in ("config", "step_ms", "tokens_per_s", "ratio_vs_bench")))
        console.print(table)
        return 0

    from .bench.train_step import run_bench

    rows = run_bench(recipe, vocab_size=_vocab_for(recipe), stores=[s for s in args.stores.split(",") if s],
                     steps=args.steps, warmup=args.warmup, out=args.out, compile=args.compile)
    table = Table(title=f"training step, {rows[0]['device']}, batch {rows[0]['batch']} x {rows[0]['seq_len']}")
    for col in ("config", "step_ms", "tokens_per_s", "tflops_per_s", "mfu", "ratio_vs_anchor", "peak_mem_gib"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        table.add_row(*(str(r.get(c, r.get("error", "-") if c == "step_ms" else "-"))
                        for c in ("config", "step_ms", "tokens_per_s", "tflops_per_s", "mfu", "ratio_vs_anchor",
                                  "peak_mem_gib")))
    console.print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from .user_errors import USER_ERRORS

    try:
        if args.command == "plugins":
            from .registry import print_plugins

            broken = print_plugins(console)
            return 1 if broken else 0
        if args.command == "eval":
            from .eval.report import eval_from_args

            eval_from_args(args, console)
            return 0
        recipe = _load(args)
        if args.print_config:
            from .config import to_yaml

            print(to_yaml(recipe), end="")
            return 0
        if args.command == "bench":
            return _bench(args, recipe)
        if args.command == "index":
            from .index import ensure_index

            ensure_index(recipe, console, rebuild=args.rebuild)
            return 0
        if args.command == "fit":
            if args.dry_run:
                dry_run(recipe)
                return 0
            from .train.fit import fit

            fit(recipe, resume=args.resume, console=console)
            return 0
    except USER_ERRORS as exc:
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

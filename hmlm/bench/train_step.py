"""`hmlm bench train`: training-step throughput of a recipe's model, with and without memory, in one process.

The bench runs the training step of `hmlm fit` itself (hmlm.train.step.TrainStep: forward with per-sample fetched
memory and generic draws, the fused chunked loss, backward, anchor clipping and AdamW -- fused on CUDA --, the lazy
bank AdamW with the recipe's memory optimizer settings), under bf16 autocast on CUDA as fit's bf16-mixed precision
does. Only the data differ: synthetic token batches, packed into documents of random lengths when data.doc_mask is
on (as fit's batches are), and uniformly random tree paths (the worst case for block reuse). The baseline (the
anchor alone) is measured in the same run, so the ratio is meaningful on any machine.

MFU counts model FLOPs only (PaLM appendix B): 6·N per token for the N matmul parameters a token passes through
(anchor without the embedding lookup, plus the fetched memory) and 12·L·T·h·d_h for attention.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..config import Recipe
from ..model import MemoryLM, build_anchor, build_layout, build_store
from ..train.step import BankOptimizer, PlainEngine, TrainStep, build_anchor_optimizer
from ..utils import write_json

# dense bf16 peak (TFLOP/s) by device name; used for MFU
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def flops_per_token(model, seq_len: int) -> float:
    anchor = model.anchor
    shape = anchor.shape
    n = sum(p.numel() for name, p in anchor.named_parameters() if "tok_emb" not in name)
    if anchor.config.tied_embeddings:
        n += anchor.config.vocab_size * shape.d_model  # the tied head is still a matmul
    fetched = model.layout.fetched_params() if model.layout is not None else 0
    return 6.0 * (n + fetched) + 12.0 * shape.n_layers * seq_len * shape.attn_dim


def synthetic_batches(recipe: Recipe, vocab_size: int, device: torch.device, seed: int) -> Iterator[dict]:
    """Endless training batches of the recipe's shape: random tokens, random tree paths and, with data.doc_mask,
    documents of random lengths (uniform in [seq_len/16, seq_len/2], the last one cut by the sequence end)."""
    b, t = recipe.trainer.batch_size, recipe.data.seq_len
    levels, k = recipe.index.router.levels, recipe.index.router.branching
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, vocab_size, (b, t + 1), generator=gen)
        paths = torch.stack([torch.randint(0, k ** (lvl + 1), (b,), generator=gen) for lvl in range(levels)], 1)
        lengths = torch.randint(max(1, t // 16), max(2, t // 2) + 1, (b, t), generator=gen)
        # document index of each position: a new document starts after each drawn length
        starts = torch.zeros(b, t, dtype=torch.long)
        for row in range(b):
            ends = lengths[row].cumsum(0)
            starts[row, ends[ends < t]] = 1
        batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(), "path": paths,
                 "doc_ids": starts.cumsum(1)}
        yield {key: v.to(device, non_blocking=True) if key != "path" else v for key, v in batch.items()}


def announced_ahead(batches: Iterator[dict], announce: Callable[[torch.Tensor], None]) -> Iterator[dict]:
    """The batches in fit's order of events: batch n+1 is drawn, and its paths announced to the bank's prefetch
    (hmlm.train.datamodule.AnnouncingLoader), before step n runs, so host/disk levels stage while a step computes."""
    upcoming = next(batches)
    announce(upcoming["path"])
    while True:
        current, upcoming = upcoming, next(batches)
        announce(upcoming["path"])
        yield current


def bench_recipe(recipe: Recipe, store: str | None) -> Recipe:
    """The recipe of one bench row: the anchor alone (store=None) or, with memory on `store`, the recipe's mode when
    it trains memory (memory, cotrain, scratch) and co-training otherwise."""
    if store is None:
        return replace(recipe, trainer=replace(recipe.trainer, mode="anchor"))
    mode = recipe.trainer.mode if recipe.trainer.mode != "anchor" else "cotrain"
    return replace(recipe, memory=replace(recipe.memory, store=store), trainer=replace(recipe.trainer, mode=mode))


def measure(recipe: Recipe, *, vocab_size: int, store: str | None, steps: int, warmup: int,
            device: torch.device, compile: bool = False) -> dict[str, Any]:
    """Tokens/s of one configuration; store=None measures the anchor alone."""
    recipe = bench_recipe(recipe, store)
    torch.manual_seed(recipe.seed)
    anchor = build_anchor(recipe, vocab_size)
    layout = build_layout(recipe, anchor)
    # block values do not change the cost of a step, so skip initialising a multi-billion bank on the CPU
    model = MemoryLM(anchor, layout, build_store(recipe, layout, init=False, anchor=anchor)).to(device)
    if model.store is not None:
        model.store.to_compute(device)
        if hasattr(model.store, "fill"):
            model.store.fill(0.0)  # commit host memory and write disk files: reading never-written pages is free
    step_fn = TrainStep(model, recipe, compile=compile)
    anchor_opt = build_anchor_optimizer(model.anchor, recipe.optim.anchor) if step_fn.train_anchor else None
    bank_opt = BankOptimizer(model.store, recipe.optim.memory) if step_fn.train_memory else None
    engine = PlainEngine()
    b, t = recipe.trainer.batch_size, recipe.data.seq_len
    data = synthetic_batches(recipe, vocab_size, device, recipe.seed)
    prefetch = getattr(model.store, "prefetch", None) if step_fn.train_memory else None
    if prefetch is not None:
        data = announced_ahead(data, prefetch)

    def run(step: int) -> torch.Tensor:
        with autocast(device):
            return step_fn(next(data), step=step, anchor_opt=anchor_opt, bank_opt=bank_opt, engine=engine)

    for i in range(warmup):
        run(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    # batches are drawn inside the timed loop, as fit's loader does (their cost on the host is small)
    t0 = time.perf_counter()
    for i in range(steps):
        loss = run(warmup + i)
    final_loss = float(loss) if steps else float("nan")   # one sync at the end: waits for the queued steps
    seconds = time.perf_counter() - t0
    tokens = steps * b * t
    tps = tokens / seconds
    peak = peak_flops(device)
    fpt = flops_per_token(model, t)
    tiers = None
    if model.store is not None and hasattr(model.store, "tier_of"):
        tiers = ",".join(model.store.tier_of(f"l{lvl}") for lvl in model.layout.active_levels)
    out = {
        "config": row_name(store, compile, tiers if store == "tiered" else None),
        "tiers": tiers,
        "optim_state": recipe.memory.optim_state if store is not None else None,
        "branching": recipe.index.router.branching,
        "host_rss_gib": round(_rss_bytes() / 2 ** 30, 2),
        "batch": b, "seq_len": t, "steps": steps, "doc_mask": recipe.data.doc_mask,
        "compile_mode": recipe.trainer.compile_mode if compile else None,
        "step_ms": round(1000 * seconds / steps, 2),
        "tokens_per_s": round(tps, 1),
        "tflops_per_s": round(tps * fpt / 1e12, 2),
        "mfu": round(tps * fpt / peak, 4) if peak else None,
        "anchor_params": sum(p.numel() for p in model.anchor.parameters()),
        "fetched_params": model.layout.fetched_params() if model.layout else 0,
        "bank_params": model.layout.bank_params() if model.layout else 0,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None,
        "final_loss": round(final_loss, 4),
    }
    if model.store is not None and hasattr(model.store, "bytes_by_tier"):
        out["bank_bytes_by_tier"] = model.store.bytes_by_tier()
        model.store.close()
    del model, anchor_opt, bank_opt, step_fn
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def row_name(store: str | None, compile: bool, tiers: str | None = None) -> str:
    return (("anchor only" if store is None else f"anchor + memory ({store} store)")
            + (f" tiers {tiers}" if tiers else "") + (", compiled" if compile else ""))


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """What fit's precision does: bf16 autocast on CUDA (trainer.precision auto = bf16-mixed), float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _rss_bytes() -> int:
    from ..utils import proc_status_bytes

    return proc_status_bytes("/proc/self/status", "VmRSS") or 0


def measure_or_oom(recipe: Recipe, **kw) -> dict[str, Any]:
    """`measure`, or a row saying the configuration ran out of accelerator memory (the next rows still run)."""
    try:
        return measure(recipe, **kw)
    except torch.cuda.OutOfMemoryError as exc:
        message = str(exc).splitlines()[0][:200]
    import gc

    gc.collect()  # the failed row's model and bank (held by the traceback until here)
    torch.cuda.empty_cache()
    store = kw.get("store")
    return {"config": row_name(store, kw.get("compile", False), str(recipe.memory.tiers) if store == "tiered" else None),
            "tiers": str(recipe.memory.tiers) if store is not None else None,
            "branching": recipe.index.router.branching,
            "batch": recipe.trainer.batch_size, "seq_len": recipe.data.seq_len, "tokens_per_s": None,
            "error": f"out of memory: {message}"}


def tier_rows(recipe: Recipe, *, vocab_size: int, tiers: list[str], branchings: list[int], steps: int, warmup: int,
              device: torch.device, compile: bool = False) -> Iterator[dict[str, Any]]:
    """Memory rows of the tiered store, each as soon as it is measured: one per tier plan (`auto`, `host`,
    `device,device,host`, ...) at the recipe's branching, then a bank-size sweep (same fetch size, bank grown by the
    branching k) with the first plan."""
    for spec in tiers:
        plan: Any = spec.split(",") if "," in spec else spec
        r = replace(recipe, memory=replace(recipe.memory, store="tiered", tiers=plan))
        yield measure_or_oom(r, vocab_size=vocab_size, store="tiered", steps=steps, warmup=warmup, device=device,
                             compile=compile)
    for k in branchings:
        plan = tiers[0].split(",") if tiers and "," in tiers[0] else (tiers[0] if tiers else "auto")
        r = replace(recipe, memory=replace(recipe.memory, store="tiered", tiers=plan),
                    index=replace(recipe.index, router=replace(recipe.index.router, branching=k)))
        row = measure_or_oom(r, vocab_size=vocab_size, store="tiered", steps=steps, warmup=warmup, device=device,
                             compile=compile)
        row["sweep"] = "bank size"
        yield row


def run_bench(recipe: Recipe, *, vocab_size: int, stores: list[str], steps: int, warmup: int,
              out: Path | None = None, compile: bool = False, tiers: list[str] | None = None,
              branchings: list[int] | None = None, anchor: bool = True) -> list[dict[str, Any]]:
    """The anchor alone (first, the baseline of `ratio_vs_anchor`), then memory on each store, then the tiered
    store's plans. `out` is rewritten after every row, so a run cut short (a deadline, a crash) keeps what it
    measured."""
    device = bench_device()
    torch.backends.cuda.matmul.allow_tf32 = True

    def store_rows() -> Iterator[dict[str, Any]]:
        for store in ([None] if anchor else []) + list(stores):
            yield measure_or_oom(recipe, vocab_size=vocab_size, store=store, steps=steps, warmup=warmup,
                                 device=device, compile=compile)

    rows: list[dict[str, Any]] = []
    more = tier_rows(recipe, vocab_size=vocab_size, tiers=list(tiers or []), branchings=list(branchings or []),
                     steps=steps, warmup=warmup, device=device, compile=compile)
    for row in itertools.chain(store_rows(), more):
        base = rows[0]["tokens_per_s"] if anchor and rows else row["tokens_per_s"] if anchor else None
        row["ratio_vs_anchor"] = round(row["tokens_per_s"] / base, 3) if base and row["tokens_per_s"] else None
        row["device"] = device_name(device)
        rows.append(row)
        if out is not None:
            write_json(out, rows)
    return rows


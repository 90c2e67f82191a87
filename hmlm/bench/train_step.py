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
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch

from ..config import Recipe
from ..model import MemoryLM, build_anchor, build_layout, build_store
from ..train.step import BankOptimizer, PlainEngine, TrainStep, build_anchor_optimizer

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
    model = MemoryLM(anchor, layout, build_store(recipe, layout, init=False)).to(device)
    if model.store is not None:
        model.store.to_compute(device)
    step_fn = TrainStep(model, recipe, compile=compile)
    anchor_opt = build_anchor_optimizer(model.anchor, recipe.optim.anchor) if step_fn.train_anchor else None
    bank_opt = BankOptimizer(model.store, recipe.optim.memory) if step_fn.train_memory else None
    engine = PlainEngine()
    b, t = recipe.trainer.batch_size, recipe.data.seq_len
    data = synthetic_batches(recipe, vocab_size, device, recipe.seed)

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
    out = {
        "config": row_name(store, compile),
        "batch": b, "seq_len": t, "steps": steps, "doc_mask": recipe.data.doc_mask,
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
    del model, anchor_opt, bank_opt, step_fn
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def row_name(store: str | None, compile: bool) -> str:
    return ("anchor only" if store is None else f"anchor + memory ({store} store)") + (", compiled" if compile else "")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """What fit's precision does: bf16 autocast on CUDA (trainer.precision auto = bf16-mixed), float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_bench(recipe: Recipe, *, vocab_size: int, stores: list[str], steps: int, warmup: int,
              out: Path | None = None, compile: bool = False) -> list[dict[str, Any]]:
    device = bench_device()
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = [_measure_or_oom(recipe, vocab_size=vocab_size, store=store, steps=steps, warmup=warmup, device=device,
                            compile=compile) for store in [None, *stores]]
    base = rows[0].get("tokens_per_s")
    for row in rows:
        if base and "tokens_per_s" in row:
            row["ratio_vs_anchor"] = round(row["tokens_per_s"] / base, 3)
        row["device"] = device_name(device)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return rows


def _measure_or_oom(recipe: Recipe, *, store: str | None, device: torch.device, compile: bool,
                    **kwargs: Any) -> dict[str, Any]:
    """One row; a configuration that does not fit the GPU gives a row saying so instead of ending the run."""
    try:
        return measure(recipe, store=store, device=device, compile=compile, **kwargs)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        return {"config": row_name(store, compile), "batch": recipe.trainer.batch_size, "seq_len": recipe.data.seq_len,
                "error": f"out of memory: {str(exc).splitlines()[0][:200]}"}

"""`hmlm bench train`: training-step throughput of a recipe's model, with and without memory, in one process.

Synthetic token batches and uniformly random tree paths (the worst case for block reuse) drive the real training
step: forward with per-sample fetched memory, backward, anchor AdamW (fused on CUDA), lazy bank AdamW. The baseline
(the anchor alone) is measured in the same run, so the ratio is meaningful on any machine.

MFU counts model FLOPs only (PaLM appendix B): 6·N per token for the N matmul parameters a token passes through
(anchor without the embedding lookup, plus the fetched memory) and 12·L·T·h·d_h for attention.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import Recipe
from ..model import MemoryLM, build_anchor, build_layout, build_store

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


def _step(model, opt, batch, *, train_memory: bool, lr_memory: float, device) -> None:
    ids, paths = batch
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    with autocast:
        logits = model(ids[:, :-1], paths=paths, memory="fetched" if train_memory else "none",
                       grad_memory=train_memory)
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.anchor.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if train_memory:
        model.store.step(lr=lr_memory, weight_decay=1e-3, grad_clip=1.0)


def _bench_recipe(recipe: Recipe, store: str | None) -> Recipe:
    if store is None:
        return replace(recipe, trainer=replace(recipe.trainer, mode="anchor"))
    return replace(recipe, memory=replace(recipe.memory, store=store), trainer=replace(recipe.trainer, mode="cotrain"))


def _build(recipe: Recipe, vocab_size: int, device: torch.device, compile: bool):
    torch.manual_seed(recipe.seed)
    anchor = build_anchor(recipe, vocab_size)
    layout = build_layout(recipe, anchor)
    # block values do not change the cost of a step, so skip initialising a multi-billion bank on the CPU
    model = MemoryLM(anchor, layout, build_store(recipe, layout, init=False, anchor=anchor)).to(device)
    if model.store is not None:
        model.store.to_compute(device)
        if hasattr(model.store, "fill"):
            model.store.fill(0.0)  # commit host memory and write disk files: reading never-written pages is free
    if compile:
        model.anchor = torch.compile(model.anchor)
    opt = torch.optim.AdamW(model.anchor.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    return model, opt


def _config_name(model, store: str | None, compile: bool) -> tuple[str, str | None]:
    tiers = None
    if model.store is not None and hasattr(model.store, "tier_of"):
        tiers = ",".join(model.store.tier_of(f"l{lvl}") for lvl in model.layout.active_levels)
    name = (("anchor only" if store is None else f"anchor + memory ({store} store)")
            + (f" tiers {tiers}" if tiers and store == "tiered" else "") + (", compiled" if compile else ""))
    return name, tiers


def _timed_steps(model, opt, recipe: Recipe, *, vocab_size: int, batch_size: int, steps: int, warmup: int,
                 device: torch.device) -> dict[str, Any]:
    b, t = batch_size, recipe.data.seq_len
    gen = torch.Generator().manual_seed(recipe.seed)
    levels = recipe.index.router.levels
    k = recipe.index.router.branching

    def batch():
        ids = torch.randint(0, vocab_size, (b, t + 1), generator=gen).to(device)
        paths = torch.stack([torch.randint(0, k ** (l + 1), (b,), generator=gen) for l in range(levels)], 1)
        return ids, paths

    train_memory = model.store is not None
    prefetch = getattr(model.store, "prefetch", None) if train_memory else None
    warm = [batch() for _ in range(warmup)]
    batches = [batch() for _ in range(steps)]
    for i, bt in enumerate(warm):
        if prefetch is not None:  # the data loader's announcement of the next batch (see AnnouncingLoader)
            prefetch((warm + batches)[i + 1][1])
        _step(model, opt, bt, train_memory=train_memory, lr_memory=1e-4, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i, bt in enumerate(batches):
        if prefetch is not None and i + 1 < len(batches):
            prefetch(batches[i + 1][1])
        _step(model, opt, bt, train_memory=train_memory, lr_memory=1e-4, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    tps = steps * b * t / seconds
    peak = peak_flops(device)
    fpt = flops_per_token(model, t)
    return {
        "batch": b, "seq_len": t, "steps": steps,
        "step_ms": round(1000 * seconds / steps, 2),
        "tokens_per_s": round(tps, 1),
        "tflops_per_s": round(tps * fpt / 1e12, 2),
        "mfu": round(tps * fpt / peak, 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None,
        "host_rss_gib": round(_rss_bytes() / 2 ** 30, 2),
    }


def _oom_message(exc: BaseException) -> str:
    return f"out of memory: {str(exc).splitlines()[0]}"


def _free_after_oom(device: torch.device) -> None:
    import gc

    gc.collect()  # the failed row's tensors (held by the traceback until here)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_batches(recipe: Recipe, *, vocab_size: int, store: str | None, steps: int, warmup: int,
                    device: torch.device, compile: bool = False, batches: list[int] | None = None
                    ) -> list[dict[str, Any]]:
    """Tokens/s of one configuration at each batch size, the model and bank built once; store=None measures the
    anchor alone. A batch size (or the build) that runs out of accelerator memory becomes a row with an `error`
    and the other rows still run."""
    recipe = _bench_recipe(recipe, store)
    sizes = list(batches or [recipe.trainer.batch_size])
    common = {"store": store, "optim_state": recipe.memory.optim_state if store is not None else None,
              "branching": recipe.index.router.branching, "seq_len": recipe.data.seq_len}
    try:
        model, opt = _build(recipe, vocab_size, device, compile)
    except torch.cuda.OutOfMemoryError as exc:
        message = _oom_message(exc)
    else:
        message = None
    if message is not None:
        _free_after_oom(device)  # outside the except block: its traceback held the half-built model
        tiers = str(recipe.memory.tiers) if store == "tiered" else None
        return [{**common, "config": f"anchor + memory ({store} store)" + (f" tiers {tiers}" if tiers else ""),
                 "tiers": tiers, "batch": b, "tokens_per_s": None, "error": message} for b in sizes]
    name, tiers = _config_name(model, store, compile)
    common.update(config=name, tiers=tiers, anchor_params=sum(p.numel() for p in model.anchor.parameters()),
                  fetched_params=model.layout.fetched_params() if model.layout else 0,
                  bank_params=model.layout.bank_params() if model.layout else 0)
    if model.store is not None and hasattr(model.store, "bytes_by_tier"):
        common["bank_bytes_by_tier"] = model.store.bytes_by_tier()
    rows = []
    for b in sizes:
        try:
            rows.append({**common, **_timed_steps(model, opt, recipe, vocab_size=vocab_size, batch_size=b,
                                                  steps=steps, warmup=warmup, device=device)})
            message = None
        except torch.cuda.OutOfMemoryError as exc:
            message = _oom_message(exc)
        if message is not None:  # the failed step's activations are free once the except block has ended
            opt.zero_grad(set_to_none=True)
            _free_after_oom(device)
            rows.append({**common, "batch": b, "tokens_per_s": None, "error": message})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if model.store is not None and hasattr(model.store, "close"):
        model.store.close()
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure(recipe: Recipe, *, vocab_size: int, store: str | None, steps: int, warmup: int,
            device: torch.device, compile: bool = False) -> dict[str, Any]:
    """Tokens/s of one configuration at the recipe's batch size (see measure_batches)."""
    return measure_batches(recipe, vocab_size=vocab_size, store=store, steps=steps, warmup=warmup, device=device,
                           compile=compile)[0]


def _rss_bytes() -> int:
    from ..utils import proc_status_bytes

    return proc_status_bytes("/proc/self/status", "VmRSS") or 0


def tiered(recipe: Recipe, spec: str) -> Recipe:
    """The recipe with the tiered store and a tier plan from the command line: `auto`, one tier for every level,
    or one per level with memory (`device,device,host`)."""
    plan: Any = spec.split(",") if "," in spec else spec
    return replace(recipe, memory=replace(recipe.memory, store="tiered", tiers=plan))


def tier_rows(recipe: Recipe, *, vocab_size: int, tiers: list[str], branchings: list[int], steps: int, warmup: int,
              device: torch.device, compile: bool = False, batches: list[int] | None = None) -> list[dict[str, Any]]:
    """Memory rows of the tiered store: one per tier plan (`auto`, `host`, `device,device,host`, ...) at the recipe's
    branching, then a bank-size sweep (same fetch size, bank grown by the branching k) with the first plan."""
    rows = []
    kw = dict(vocab_size=vocab_size, store="tiered", steps=steps, warmup=warmup, device=device, compile=compile,
              batches=batches)
    for spec in tiers:
        rows += measure_batches(tiered(recipe, spec), **kw)
    for k in branchings:
        r = tiered(recipe, tiers[0] if tiers else "auto")
        r = replace(r, index=replace(r.index, router=replace(r.index.router, branching=k)))
        rows += [{**row, "sweep": "bank size"} for row in measure_batches(r, **kw)]
    return rows


def add_ratios(rows: list[dict[str, Any]], device: torch.device) -> None:
    """Each row's throughput against the anchor alone at the same batch size, measured in the same run."""
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r.get("store", "") is None and r.get("tokens_per_s")}
    for row in rows:
        b = base.get(row["batch"])
        row["ratio_vs_anchor"] = round(row["tokens_per_s"] / b, 3) if b and row.get("tokens_per_s") else None
        row["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_bench(recipe: Recipe, *, vocab_size: int, stores: list[str], steps: int, warmup: int,
              out: Path | None = None, compile: bool = False, tiers: list[str] | None = None,
              branchings: list[int] | None = None, anchor: bool = True,
              batches: list[int] | None = None) -> list[dict[str, Any]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    kw = dict(vocab_size=vocab_size, steps=steps, warmup=warmup, device=device, compile=compile, batches=batches)
    rows = measure_batches(recipe, store=None, **kw) if anchor else []
    for store in stores:
        rows += measure_batches(recipe, store=store, **kw)
    if tiers or branchings:
        rows += tier_rows(recipe, tiers=list(tiers or []), branchings=list(branchings or []), **kw)
    add_ratios(rows, device)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return rows

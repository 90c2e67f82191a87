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
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..config import Recipe
from ..model import MemoryLM, build_anchor, build_layout, build_store
from ..train.step import BankOptimizer, PlainEngine, TrainStep, build_anchor_optimizer
from ..utils import write_json

# steps run under torch.profiler per row with --profile (after the timed steps)
PROFILE_STEPS = 3
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


class _Trainer:
    """One configuration's model, shared step and optimizers, built once and timed at each batch size."""

    def __init__(self, recipe: Recipe, vocab_size: int, device: torch.device, compile: bool):
        torch.manual_seed(recipe.seed)
        anchor = build_anchor(recipe, vocab_size)
        layout = build_layout(recipe, anchor)
        # block values do not change the cost of a step, so skip initialising a multi-billion bank on the CPU
        self.model = MemoryLM(anchor, layout, build_store(recipe, layout, init=False, anchor=anchor)).to(device)
        store = self.model.store
        if store is not None:
            store.to_compute(device)
            if hasattr(store, "fill"):
                store.fill(0.0)  # commit host memory and write disk files: reading never-written pages is free
        self.step_fn = TrainStep(self.model, recipe, compile=compile)
        self.anchor_opt = (build_anchor_optimizer(self.model.anchor, recipe.optim.anchor)
                           if self.step_fn.train_anchor else None)
        self.bank_opt = BankOptimizer(store, recipe.optim.memory) if self.step_fn.train_memory else None
        self.engine = PlainEngine()

    def step(self, batch: dict[str, torch.Tensor], step: int, device: torch.device) -> torch.Tensor:
        with autocast(device):
            return self.step_fn(batch, step=step, anchor_opt=self.anchor_opt, bank_opt=self.bank_opt,
                                engine=self.engine)

    def forget_step(self) -> None:
        """After a step that ran out of memory: drop its gradients and fetched blocks."""
        if self.anchor_opt is not None:
            self.anchor_opt.zero_grad(set_to_none=True)
        if self.model.store is not None:
            self.model.store.discard_fetched()

    def close(self) -> None:
        if self.model.store is not None and hasattr(self.model.store, "close"):
            self.model.store.close()


def _timed_steps(trainer: _Trainer, recipe: Recipe, *, vocab_size: int, batch_size: int, steps: int, warmup: int,
                 device: torch.device, profile: Path | None = None, profile_name: str = "") -> dict[str, Any]:
    b, t = batch_size, recipe.data.seq_len
    shape = replace(recipe, trainer=replace(recipe.trainer, batch_size=b))
    data = synthetic_batches(shape, vocab_size, device, recipe.seed)
    prefetch = getattr(trainer.model.store, "prefetch", None) if trainer.step_fn.train_memory else None
    if prefetch is not None:
        data = announced_ahead(data, prefetch)
    for i in range(warmup):
        trainer.step(next(data), i, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    # HMLM_SYNC_DEBUG=1 (CUDA): warn, with the stack, at every operation in the timed steps that makes the host wait
    # for the device (a stall the step should not have; the final loss read is after the loop)
    sync_debug = device.type == "cuda" and os.environ.get("HMLM_SYNC_DEBUG") == "1"
    if sync_debug:
        torch.cuda.set_sync_debug_mode("warn")
    # batches are drawn inside the timed loop, as fit's loader does (their cost on the host is small)
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    try:
        for i in range(steps):
            loss = trainer.step(next(data), warmup + i, device)
    finally:
        if sync_debug:
            torch.cuda.set_sync_debug_mode("default")
    final_loss = float(loss)   # one sync at the end: waits for the queued steps
    seconds = time.perf_counter() - t0
    tps = steps * b * t / seconds
    peak = peak_flops(device)
    fpt = flops_per_token(trainer.model, t)
    extra: dict[str, Any] = {}
    if profile is not None:  # after the timing, so the profiler's own overhead never reaches tokens_per_s
        from .profile import profile_steps

        first = warmup + steps
        extra["profile"] = profile_steps(lambda i: trainer.step(next(data), first + i, device), steps=PROFILE_STEPS,
                                         device=device, out_dir=profile, name=f"{profile_name}_b{b}")
    return {
        "batch": b, "seq_len": t, "steps": steps,
        "step_ms": round(1000 * seconds / steps, 2),
        "tokens_per_s": round(tps, 1),
        "tflops_per_s": round(tps * fpt / 1e12, 2),
        "mfu": round(tps * fpt / peak, 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None,
        "host_rss_gib": round(_rss_bytes() / 2 ** 30, 2),
        "final_loss": round(final_loss, 4),
        **extra,
    }


def _oom_message(exc: BaseException) -> str:
    return f"out of memory: {str(exc).splitlines()[0][:200]}"


def _free_after_oom(device: torch.device) -> None:
    import gc

    gc.collect()  # the failed row's tensors (held by the traceback until here)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_batches(recipe: Recipe, *, vocab_size: int, store: str | None, steps: int, warmup: int,
                    device: torch.device, compile: bool = False, batches: list[int] | None = None,
                    profile: Path | None = None) -> list[dict[str, Any]]:
    """Tokens/s of one configuration at each batch size, the model and bank built once; store=None measures the
    anchor alone. A batch size (or the build) that runs out of accelerator memory becomes a row with an `error`
    and the other rows still run."""
    recipe = bench_recipe(recipe, store)
    sizes = list(batches or [recipe.trainer.batch_size])
    # the tier plan (memory.tiers: auto) leaves room for the largest batch measured, not the recipe's
    recipe = replace(recipe, trainer=replace(recipe.trainer, batch_size=max(sizes)))
    common = {"store": store, "optim_state": recipe.memory.optim_state if store is not None else None,
              "branching": recipe.index.router.branching, "seq_len": recipe.data.seq_len,
              "doc_mask": recipe.data.doc_mask, "compile_mode": recipe.trainer.compile_mode if compile else None}
    try:
        trainer = _Trainer(recipe, vocab_size, device, compile)
    except torch.cuda.OutOfMemoryError as exc:
        message = _oom_message(exc)
    except Exception as exc:  # a store that cannot be built here (e.g. zero3 without DeepSpeed): an error row
        import logging

        logging.getLogger("hmlm.bench").exception("building %s failed", row_name(store, compile))
        message = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
    else:
        message = None
    if message is not None:
        _free_after_oom(device)  # outside the except block: its traceback held the half-built model
        tiers = str(recipe.memory.tiers) if store == "tiered" else None
        return [{**common, "config": row_name(store, compile, tiers), "tiers": tiers, "batch": b,
                 "tokens_per_s": None, "error": message} for b in sizes]
    model = trainer.model
    tiers = None
    if model.store is not None and hasattr(model.store, "tier_of"):
        tiers = ",".join(model.store.tier_of(f"l{lvl}") for lvl in model.layout.active_levels)
    common.update(config=row_name(store, compile, tiers if store == "tiered" else None), tiers=tiers,
                  anchor_params=sum(p.numel() for p in model.anchor.parameters()),
                  fetched_params=model.layout.fetched_params() if model.layout else 0,
                  bank_params=model.layout.bank_params() if model.layout else 0)
    if model.store is not None and hasattr(model.store, "bytes_by_tier"):
        common["bank_bytes_by_tier"] = model.store.bytes_by_tier()
    if model.store is not None and hasattr(model.store, "ops_used"):
        common.update(model.store.ops_used())   # disk_io (aio | threads), host_update (gpu | cpu_adam)
    rows = []
    for b in sizes:
        try:
            rows.append({**common, **_timed_steps(trainer, recipe, vocab_size=vocab_size, batch_size=b,
                                                  steps=steps, warmup=warmup, device=device, profile=profile,
                                                  profile_name=common["config"])})
            message = None
        except torch.cuda.OutOfMemoryError as exc:
            message = _oom_message(exc)
        if message is not None:  # the failed step's activations are free once the except block has ended
            trainer.forget_step()
            _free_after_oom(device)
            rows.append({**common, "batch": b, "tokens_per_s": None, "error": message})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    trainer.close()
    del trainer, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure(recipe: Recipe, *, vocab_size: int, store: str | None, steps: int, warmup: int,
            device: torch.device, compile: bool = False) -> dict[str, Any]:
    """Tokens/s of one configuration at the recipe's batch size (see measure_batches)."""
    return measure_batches(recipe, vocab_size=vocab_size, store=store, steps=steps, warmup=warmup, device=device,
                           compile=compile)[0]


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


def tiered(recipe: Recipe, spec: str) -> Recipe:
    """The recipe with the tiered store and a tier plan from the command line: `auto`, one tier for every level,
    or one per level with memory (`device,device,host`)."""
    plan: Any = spec.split(",") if "," in spec else spec
    return replace(recipe, memory=replace(recipe.memory, store="tiered", tiers=plan))


def tier_rows(recipe: Recipe, *, vocab_size: int, tiers: list[str], branchings: list[int], steps: int, warmup: int,
              device: torch.device, compile: bool = False, batches: list[int] | None = None,
              profile: Path | None = None) -> Iterator[list[dict[str, Any]]]:
    """Memory rows of the tiered store, one configuration's rows at a time: one per tier plan (`auto`, `host`,
    `device,device,host`, ...) at the recipe's branching, then a bank-size sweep (same fetch size, bank grown by the
    branching k) with the first plan."""
    kw = dict(vocab_size=vocab_size, store="tiered", steps=steps, warmup=warmup, device=device, compile=compile,
              batches=batches, profile=profile)
    for spec in tiers:
        yield measure_batches(tiered(recipe, spec), **kw)
    for k in branchings:
        r = tiered(recipe, tiers[0] if tiers else "auto")
        r = replace(r, index=replace(r.index, router=replace(r.index.router, branching=k)))
        yield [{**row, "sweep": "bank size"} for row in measure_batches(r, **kw)]


def add_ratios(rows: list[dict[str, Any]], device: torch.device) -> None:
    """Each row's throughput against the anchor alone at the same batch size, measured in the same run."""
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r.get("store", "") is None and r.get("tokens_per_s")}
    for row in rows:
        b = base.get(row["batch"])
        row["ratio_vs_anchor"] = round(row["tokens_per_s"] / b, 3) if b and row.get("tokens_per_s") else None
        row["device"] = device_name(device)


def run_bench(recipe: Recipe, *, vocab_size: int, stores: list[str], steps: int, warmup: int,
              out: Path | None = None, compile: bool = False, tiers: list[str] | None = None,
              branchings: list[int] | None = None, anchor: bool = True,
              batches: list[int] | None = None, profile: Path | None = None) -> list[dict[str, Any]]:
    """The anchor alone (the baseline of `ratio_vs_anchor`), then memory on each store, then the tiered store's
    plans. `out` is rewritten after every configuration, so a run cut short (a deadline, a crash) keeps what it
    measured. `profile`: a folder for each row's torch.profiler table (hmlm.bench.profile), taken after its timing."""
    device = bench_device()
    torch.backends.cuda.matmul.allow_tf32 = True
    kw = dict(vocab_size=vocab_size, steps=steps, warmup=warmup, device=device, compile=compile, batches=batches,
              profile=profile)

    def groups() -> Iterator[list[dict[str, Any]]]:
        for store in ([None] if anchor else []) + list(stores):
            yield measure_batches(recipe, store=store, **kw)
        yield from tier_rows(recipe, tiers=list(tiers or []), branchings=list(branchings or []), **kw)

    rows: list[dict[str, Any]] = []
    for group in groups():
        rows += group
        add_ratios(rows, device)
        if out is not None:
            write_json(out, rows)
    return rows

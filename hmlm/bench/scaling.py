"""`hmlm bench scaling`: data-parallel training throughput on 1..N devices, subtree-affine bank vs plain DDP of the bank.

For each world size the bench spawns that many processes (NCCL on GPUs, gloo on CPUs) running the training step on
synthetic tokens, with the anchor under DistributedDataParallel (a comm hook counts its gradient bytes) or a
DeepSpeed ZeRO engine (`--strategies deepspeed_stage_1,...`, the config `hmlm fit` builds, hmlm.train.deepspeed):

    subtree     the training plan (hmlm.train.affine.plan_subtrees: token-balanced LPT at trainer.subtree_level, or
                the auto level) decides which subtrees each rank owns; the rank holds only their blocks (plus the
                shared ones above the assignment level), draws its sequences among the plan's, and reduces shared
                blocks within their owner groups with BankSync, exactly as training does
    replicated  every rank holds the whole bank and draws sequences anywhere; the bank's gradient is all-reduced densely
                every step, which is what wrapping the bank in DDP would cost (the baseline)

Paths (`--paths`): `uniform` draws 4096 sequences with uniformly random leaves and equal token counts; `index` uses
the recipe's index (every training sequence's real path and token count, as `hmlm fit` plans them).

Reported per row: tokens/s over all ranks, scaling efficiency against the 1-device row of the same mode and strategy,
bytes all-reduced per step per rank (anchor under DDP / shared bank blocks / dense bank), bank parameters and bytes
held per rank, and the plan (level, token imbalance).
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import DEEPSPEED_STRATEGIES, Recipe, recipe_from_dict, to_dict


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uniform_paths(n: int, k: int, levels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n sequences with uniformly random leaves (path [n, levels], node ids per level as the router numbers them)."""
    leaf = np.random.default_rng(seed).integers(0, k ** levels, size=n)
    paths = np.stack([leaf // k ** (levels - 1 - lvl) for lvl in range(levels)], axis=1)
    return paths.astype(np.int64), np.ones(n, dtype=np.int64)


def _anchor_engine(anchor: torch.nn.Module, opt: torch.optim.Optimizer, recipe: Recipe, strategy: str, rank: int,
                   cuda: bool):
    """The anchor under a DeepSpeed engine with the config `hmlm fit` would use (bf16 autocast on GPUs)."""
    import argparse

    import importlib

    import deepspeed

    from ..train.deepspeed import deepspeed_config

    if not cuda:  # a CPU-only all-reduce op that JIT-builds for minutes; gloo suffices (the module, not the package's
        # `torch` attribute, which is torch itself)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)  # the existing group
    cfg = deepspeed_config(replace(recipe, trainer=replace(recipe.trainer, strategy=strategy)),
                           "bf16-mixed" if cuda else "32-true")
    engine, _, _, _ = deepspeed.initialize(args=argparse.Namespace(device_rank=rank if cuda else 0), model=anchor,
                                           optimizer=opt, model_parameters=[p for p in anchor.parameters()],
                                           config=cfg, dist_init_required=False)
    return engine


def _worker(rank: int, world: int, recipe_dict: dict, vocab: int, mode: str, strategy: str, paths: np.ndarray,
            tokens: np.ndarray, steps: int, warmup: int, port: int, out: str, profile: str | None = None) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ..model import MemoryLM, build_anchor, build_layout, build_store
    from ..train.affine import BankSync, CommCounter, plan_subtrees
    from ..train.ddp import ddp_kwargs, register_anchor_hook

    cuda = torch.cuda.is_available()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    recipe = recipe_from_dict(recipe_dict)
    k = recipe.index.router.branching
    torch.manual_seed(recipe.seed)
    anchor = build_anchor(recipe, vocab)
    layout = build_layout(recipe, anchor)
    store = build_store(recipe, layout, init=False)
    # the plan training uses, computed identically on every rank
    plan = plan_subtrees(paths, tokens, world=world, branching=k, level=recipe.trainer.subtree_level)
    sync = None
    if mode == "subtree":
        seqs = plan.sequences(rank)
        if world > 1:
            store.restrict({key: torch.from_numpy(v) for key, v in plan.held_rows(rank, store.keys()).items()})
            sync = BankSync(plan, store, rank)
    else:
        seqs = np.arange(len(paths))
    anchor.to(device)
    store.to_compute(device)
    counter = CommCounter()
    opt = torch.optim.AdamW(anchor.parameters(), lr=1e-4, fused=cuda)
    deepspeed = strategy.startswith("deepspeed")
    if deepspeed:
        wrapped = _anchor_engine(anchor, opt, recipe, strategy, rank, cuda)
    else:
        # trainer.ddp as `hmlm fit` applies it: buckets, gradient views, the reduction dtype (and the bytes counted)
        wrapped = DDP(anchor, device_ids=[rank] if cuda else None, **ddp_kwargs(recipe.trainer.ddp)) \
            if world > 1 else anchor
        if world > 1:
            register_anchor_hook(wrapped, recipe.trainer.ddp, counter)
    model = MemoryLM(wrapped, layout, store)
    bank_grad = None
    if mode == "replicated" and world > 1:
        # DDP of the bank would all-reduce a gradient of the whole bank's size every step
        bank_grad = torch.zeros(layout.bank_params(), dtype=store.dtype, device=device)
    b, t = recipe.trainer.batch_size, recipe.data.seq_len
    gen = torch.Generator().manual_seed(recipe.seed * 1000 + rank)
    # DeepSpeed autocasts inside its engine (torch_autocast in its config)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and not deepspeed)
    bank_bytes = 0

    def step() -> None:
        nonlocal bank_bytes
        ids = torch.randint(0, vocab, (b, t + 1), generator=gen).to(device)
        pick = seqs[torch.randint(0, len(seqs), (b,), generator=gen).numpy()]
        with autocast:
            logits = model(ids[:, :-1], paths=torch.from_numpy(paths[pick]), memory="fetched", grad_memory=True)
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        if deepspeed:
            wrapped.backward(loss)
            wrapped.step()
        else:
            loss.backward()
        if bank_grad is not None:
            dist.all_reduce(bank_grad)
            bank_bytes += bank_grad.numel() * bank_grad.element_size()
        if sync is not None:
            sync.reduce(store, global_norm=False)
        if not deepspeed:
            opt.step()
            opt.zero_grad(set_to_none=True)
        store.step(lr=1e-4, weight_decay=1e-3)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    dist.barrier()
    counter.anchor_bytes, bank_bytes = 0, 0
    if sync is not None:
        sync.counter.shared_bytes = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    dist.barrier()
    seconds = time.perf_counter() - t0
    # the traffic of the timed steps (the profiled steps below must not add to it)
    anchor_bytes = counter.anchor_bytes
    timed_bank_bytes = bank_bytes + (sync.counter.shared_bytes if sync is not None else 0)
    prof = None
    grad_reduce = recipe.trainer.deepspeed.grad_reduce if deepspeed else recipe.trainer.ddp.grad_reduce
    if profile is not None:  # after the timing; every rank steps (the collectives need them), rank 0 is profiled
        if rank == 0:
            from .profile import profile_steps

            # a non-default DDP reduction gets its own table (beside the fp32 row's of the same world size)
            variant = f"_{grad_reduce}" if not deepspeed and grad_reduce != "fp32" else ""
            prof = profile_steps(lambda i: step(), steps=3, device=device, out_dir=Path(profile),
                                 name=f"{strategy}{variant}_{mode}_world{world}")
        else:
            for _ in range(3):
                step()
        dist.barrier()
    held = store.held_params()
    if rank == 0:
        Path(out).write_text(json.dumps({
            "mode": mode, "strategy": strategy, "world": world,
            # the anchor's reduction dtype: trainer.ddp.grad_reduce under DDP, trainer.deepspeed.grad_reduce otherwise
            "grad_reduce": grad_reduce,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "batch_per_rank": b, "seq_len": t, "steps": steps, "step_ms": round(1000 * seconds / steps, 2),
            "tokens_per_s": round(steps * b * t * world / seconds, 1),
            # DDP: measured by the comm hook; DeepSpeed reduces inside its engine (not counted: null)
            "anchor_bytes_per_step": None if deepspeed else anchor_bytes // steps,
            "anchor_grad_bytes": sum(p.numel() * 4 for p in anchor.parameters()),
            "bank_bytes_per_step": timed_bank_bytes // steps,
            "bank_params": layout.bank_params(), "bank_params_per_rank": held,
            "bank_bytes_per_rank": held * torch.finfo(store.dtype).bits // 8,
            "plan_level": plan.level, "plan_imbalance": round(plan.imbalance, 4),
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if cuda else None,
            **({"profile": prof} if prof is not None else {}),
        }))
    dist.destroy_process_group()


def scaling_paths(recipe: Recipe, source: str, n_uniform: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(paths, tokens) the plan is made from: `uniform` random leaves, or `index` = the recipe's training shards."""
    if source == "uniform":
        return uniform_paths(n_uniform, recipe.index.router.branching, recipe.index.router.levels, recipe.seed)
    if source == "index":
        from ..data.packing import SequenceShards
        from ..train.affine import shard_paths_and_tokens

        shards = Path(recipe.index.dir) / "shards"
        if not shards.is_dir():
            raise ValueError(f"--paths index: {recipe.index.dir} holds no index (run `hmlm index --recipe ...` first)")
        return shard_paths_and_tokens(SequenceShards(shards, "train"))
    raise ValueError(f"--paths {source!r}: expected uniform or index")


def plan_rows(recipe: Recipe, *, worlds: list[int], paths: str = "uniform") -> list[dict[str, Any]]:
    """What `run_scaling` would measure, without a process or a tensor: per world size the training plan (level, token
    imbalance) and the bank parameters rank 0 would hold (`--dry-run`; the layout is built on the meta device)."""
    from ..model import build_anchor, build_layout
    from ..train.affine import plan_subtrees

    layout = build_layout(recipe, build_anchor(recipe, recipe.anchor.vocab_size or 64, device="meta"))
    seq_paths, seq_tokens = scaling_paths(recipe, paths)
    keys = [f"l{lvl}" for lvl in layout.active_levels]
    rows = []
    for world in worlds:
        plan = plan_subtrees(seq_paths, seq_tokens, world=world, branching=recipe.index.router.branching,
                             level=recipe.trainer.subtree_level)
        held = plan.held_rows(0, keys)
        per_rank = sum(len(held[f"l{lvl}"]) * layout.block_params(layout.sizes[lvl]) for lvl in layout.active_levels)
        rows.append({"world": world, "paths": paths, "plan_level": plan.level,
                     "plan_imbalance": round(plan.imbalance, 4), "bank_params": layout.bank_params(),
                     "bank_params_rank0": per_rank})
    return rows


def run_scaling(recipe: Recipe, *, vocab_size: int, worlds: list[int], modes: list[str], steps: int,
                warmup: int, strategies: tuple[str, ...] = ("ddp",), paths: str = "uniform",
                out: Path | None = None, profile: Path | None = None) -> list[dict[str, Any]]:
    """Tokens/s per world size, strategy and mode, one spawned group of processes per row. `profile`: rank 0's
    torch.profiler table of 3 more steps per row (hmlm.bench.profile; collective kernels and the device's busy
    fraction show where a world size loses time)."""
    import torch.multiprocessing as mp

    for strategy in strategies:
        if strategy != "ddp" and strategy not in DEEPSPEED_STRATEGIES:
            raise ValueError(f"--strategies {strategy!r}: expected ddp or one of {', '.join(DEEPSPEED_STRATEGIES)}")
    # explicit memory.tiers are kept (a bank larger than one device); otherwise the bank lives on the device
    store = recipe.memory.store if recipe.memory.tiers != "auto" else "device"
    recipe = replace(recipe, memory=replace(recipe.memory, generic=False, store=store),
                     trainer=replace(recipe.trainer, mode="cotrain"))
    if torch.cuda.is_available() and max(worlds) > torch.cuda.device_count():
        raise ValueError(f"--devices asks for {max(worlds)} GPUs, this machine has {torch.cuda.device_count()}")
    seq_paths, seq_tokens = scaling_paths(recipe, paths)
    rows: list[dict[str, Any]] = []
    for strategy in strategies:
        for mode in modes:
            group = []
            for world in worlds:
                with tempfile.TemporaryDirectory() as tmp:
                    result = Path(tmp) / "row.json"
                    mp.spawn(_worker, args=(world, to_dict(recipe), vocab_size, mode, strategy, seq_paths, seq_tokens,
                                            steps, warmup, _free_port(), str(result),
                                            None if profile is None else str(profile)), nprocs=world, join=True)
                    group.append({**json.loads(result.read_text()), "paths": paths})
            base = min(group, key=lambda r: r["world"])
            for r in group:
                r["scaling_efficiency"] = round(r["tokens_per_s"] / (base["tokens_per_s"] * r["world"] /
                                                                     base["world"]), 3)
            rows.extend(group)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return rows


REPORT_COLUMNS = ("strategy", "grad_reduce", "mode", "world", "paths", "step_ms", "tokens_per_s",
                  "scaling_efficiency", "anchor_bytes_per_step", "bank_bytes_per_step", "bank_params_per_rank",
                  "bank_bytes_per_rank", "plan_level", "plan_imbalance", "peak_gpu_gb")


def write_report(row_files: list[Path], markdown: Path, merged: Path, *, title: str) -> list[dict[str, Any]]:
    """Merge the JSON row files of several `hmlm bench scaling --out` calls into one JSON list and a markdown table
    (benchmarks/gpu_ds.sh); a missing file (a call that was skipped or failed) is listed under the table."""
    rows: list[dict[str, Any]] = []
    missing = []
    for f in row_files:
        if Path(f).is_file():
            rows.extend({**r, "source": Path(f).stem} for r in json.loads(Path(f).read_text(encoding="utf-8")))
        else:
            missing.append(Path(f).stem)
    lines = [f"# {title}", ""]
    if rows:
        lines.append(f"device: {rows[0]['device']}; {rows[0]['batch_per_rank']} x {rows[0]['seq_len']} tokens per "
                     "rank; efficiency against the 1-device row of the same strategy and mode")
        lines += ["", "| source | " + " | ".join(REPORT_COLUMNS) + " |", "|" + " --- |" * (len(REPORT_COLUMNS) + 1)]
        lines += ["| " + " | ".join([r["source"], *(str(r.get(c)) for c in REPORT_COLUMNS)]) + " |" for r in rows]
    if missing:
        lines += ["", "not measured (skipped for time, or failed: see its .log): " + ", ".join(missing)]
    markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
    merged.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return rows

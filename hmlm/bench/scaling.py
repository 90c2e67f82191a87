"""`hmlm bench scaling`: data-parallel training throughput on 1..N devices, subtree-affine bank vs plain DDP of the bank.

For each world size the bench spawns that many processes (NCCL on GPUs, gloo on CPUs) running the real training step
on synthetic tokens, with the anchor under DistributedDataParallel (a comm hook counts its gradient bytes):

    subtree     each rank owns the level-1 subtrees s with s % world == rank, holds only their blocks and draws its
                paths inside them: the bank is never communicated (DESIGN.md §6, hmlm.train.affine)
    replicated  every rank holds the whole bank and draws paths anywhere; the bank's gradient is all-reduced densely
                every step, which is what wrapping the bank in DDP would cost (the baseline)

Reported per row: tokens/s over all ranks, scaling efficiency against the 1-device row of the same mode, and bytes
all-reduced per step per rank (anchor / bank).
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

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import Recipe, recipe_from_dict, to_dict


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _owned_rows(nodes_per_level: list[int], k: int, owned: list[int]) -> dict[str, torch.Tensor]:
    """Rows of every level whose level-1 ancestor is owned (level l node n descends from n // k**l)."""
    rows = {}
    for lvl, nodes in enumerate(nodes_per_level):
        ids = torch.arange(nodes)
        rows[f"l{lvl}"] = ids[torch.isin(ids // k ** lvl, torch.tensor(owned))]
    return rows


def _sample_paths(batch: int, levels: int, k: int, owned: list[int], gen: torch.Generator) -> torch.Tensor:
    top = torch.tensor(owned)[torch.randint(0, len(owned), (batch,), generator=gen)]
    cols = [top]
    for _ in range(1, levels):
        cols.append(cols[-1] * k + torch.randint(0, k, (batch,), generator=gen))
    return torch.stack(cols, 1)


def _worker(rank: int, world: int, recipe_dict: dict, vocab: int, mode: str, steps: int, warmup: int,
            port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ..model import MemoryLM, build_anchor, build_layout, build_store
    from ..train.affine import CommCounter, counting_allreduce_hook

    cuda = torch.cuda.is_available()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    recipe = recipe_from_dict(recipe_dict)
    k, levels = recipe.index.router.branching, recipe.index.router.levels
    torch.manual_seed(recipe.seed)
    anchor = build_anchor(recipe, vocab)
    layout = build_layout(recipe, anchor)
    store = build_store(recipe, layout, init=False)
    owned = [s for s in range(k) if s % world == rank] if mode == "subtree" else list(range(k))
    if not owned:
        raise ValueError(f"world {world} > k={k} level-1 subtrees: use a deeper subtree level (trainer.subtree_level)")
    if mode == "subtree" and world > 1:
        store.restrict({key: rows for key, rows in _owned_rows([layout.nodes(l) for l in range(levels)], k, owned)
                        .items() if key in store.keys()})
    anchor.to(device)
    store.to_compute(device)
    counter = CommCounter()
    ddp = DDP(anchor, device_ids=[rank] if cuda else None) if world > 1 else anchor
    if world > 1:
        ddp.register_comm_hook(counter, counting_allreduce_hook)
    model = MemoryLM(ddp, layout, store)
    opt = torch.optim.AdamW(anchor.parameters(), lr=1e-4, fused=cuda)
    bank_grad = None
    if mode == "replicated" and world > 1:
        # DDP of the bank would all-reduce a gradient of the whole bank's size every step
        bank_grad = torch.zeros(layout.bank_params(), dtype=store.dtype, device=device)
    b, t = recipe.trainer.batch_size, recipe.data.seq_len
    gen = torch.Generator().manual_seed(recipe.seed * 1000 + rank)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    bank_bytes = 0

    def step() -> None:
        nonlocal bank_bytes
        ids = torch.randint(0, vocab, (b, t + 1), generator=gen).to(device)
        paths = _sample_paths(b, levels, k, owned, gen)
        with autocast:
            logits = model(ids[:, :-1], paths=paths, memory="fetched", grad_memory=True)
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        if bank_grad is not None:
            dist.all_reduce(bank_grad)
            bank_bytes += bank_grad.numel() * bank_grad.element_size()
        opt.step()
        opt.zero_grad(set_to_none=True)
        store.step(lr=1e-4, weight_decay=1e-3)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    dist.barrier()
    counter.anchor_bytes, bank_bytes = 0, 0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    dist.barrier()
    seconds = time.perf_counter() - t0
    if rank == 0:
        Path(out).write_text(json.dumps({
            "mode": mode, "world": world, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "batch_per_rank": b, "seq_len": t, "steps": steps, "step_ms": round(1000 * seconds / steps, 2),
            "tokens_per_s": round(steps * b * t * world / seconds, 1),
            "anchor_bytes_per_step": counter.anchor_bytes // steps, "bank_bytes_per_step": bank_bytes // steps,
            "bank_params": layout.bank_params(), "bank_params_per_rank": store.held_params(),
        }))
    dist.destroy_process_group()


def run_scaling(recipe: Recipe, *, vocab_size: int, worlds: list[int], modes: list[str], steps: int,
                warmup: int, out: Path | None = None) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    recipe = replace(recipe, memory=replace(recipe.memory, generic=False, store="device"),
                     trainer=replace(recipe.trainer, mode="cotrain"))
    if torch.cuda.is_available() and max(worlds) > torch.cuda.device_count():
        raise ValueError(f"--devices asks for {max(worlds)} GPUs, this machine has {torch.cuda.device_count()}")
    rows = []
    for mode in modes:
        for world in worlds:
            with tempfile.TemporaryDirectory() as tmp:
                result = Path(tmp) / "row.json"
                mp.spawn(_worker, args=(world, to_dict(recipe), vocab_size, mode, steps, warmup, _free_port(),
                                        str(result)), nprocs=world, join=True)
                rows.append(json.loads(result.read_text()))
        base = next(r for r in rows if r["mode"] == mode and r["world"] == min(worlds))
        for r in rows:
            if r["mode"] == mode:
                r["scaling_efficiency"] = round(r["tokens_per_s"] / (base["tokens_per_s"] * r["world"] /
                                                                     base["world"]), 3)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return rows

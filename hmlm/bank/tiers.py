"""Which tier holds each bank level: `device` (accelerator memory), `host` (CPU RAM) or `disk` (one file per level).

The paper's hardware argument, as a plan: a step touches at most `batch` blocks of a level, so the share of a level
touched per step is min(batch, nodes) / nodes. Shallow levels are small and touched every step (hot); deep levels are
large and mostly cold. Moving a level off the device costs, per step, the bytes of its touched rows (and their
optimizer state) in both directions, so the device budget goes to the levels with the highest touched share first,
the host budget to the next, and whatever is left goes to disk.

`memory.tiers` is `auto`, one tier for every level, or one tier per entry of `memory.sizes`. The budgets are measured
(free accelerator memory minus an estimate of the anchor's training footprint; 80% of MemAvailable) unless
`memory.device_budget_gb` / `memory.host_budget_gb` set them. The generic block (one block of the fetched size) always
lives on the device.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

TIERS = ("device", "host", "disk")
GiB = 1 << 30


class TierError(ValueError):
    """A tier plan that cannot be made or does not fit; the message names the key and the numbers."""


def normalize_tiers(tiers: Any, sizes: Sequence[int]) -> list[str] | None:
    """`auto` -> None; one tier -> that tier for every level; a list -> one tier per level (entries of `sizes`),
    where a list with one entry per level that holds memory (size > 0) is accepted too."""
    n_levels = len(sizes)
    if tiers is None or tiers == "auto":
        return None
    if isinstance(tiers, str):
        if tiers not in TIERS:
            raise TierError(f"got {tiers!r}, expected auto, {', '.join(TIERS)} or a list with one tier per level")
        return [tiers] * n_levels
    items = [str(t) for t in tiers]
    bad = [t for t in items if t not in TIERS]
    if bad:
        raise TierError(f"unknown tier {bad[0]!r} in {items}; tiers are {', '.join(TIERS)}")
    if len(items) == 1:
        return items * n_levels
    active = [i for i, r in enumerate(sizes) if r > 0]
    if len(items) == len(active) != n_levels:
        out = ["device"] * n_levels
        for i, t in zip(active, items):
            out[i] = t
        return out
    if len(items) != n_levels:
        raise TierError(f"{len(items)} tiers {items} for {n_levels} levels (memory.sizes {list(sizes)}, {len(active)} "
                        "with memory); give one per level, one per level with memory, one for all, or auto")
    return items


def state_bytes_per_param(optim_state: str) -> float:
    """AdamW moments per bank parameter (the factored second moment is O(rows + cols), counted as 0 here)."""
    return {"fp32": 8.0, "bf16": 4.0, "factored": 2.0}[optim_state]


@dataclass
class LevelPlan:
    key: str                 # bank key: l{level} (0-based) or generic
    level: int | None        # 1-based tree level, None for the generic block
    nodes: int
    params: int
    param_bytes: int
    state_bytes: int         # optimizer state when trained (0 for inference plans)
    touched: float           # share of the level's blocks one step touches (expected)
    tier: str = "device"

    @property
    def bytes(self) -> int:
        return self.param_bytes + self.state_bytes

    def as_dict(self) -> dict:
        return {"key": self.key, "level": self.level, "nodes": self.nodes, "params": self.params,
                "param_bytes": self.param_bytes, "state_bytes": self.state_bytes, "tier": self.tier,
                "touched_per_step": round(self.touched, 6)}


def host_memory_available() -> int:
    """MemAvailable from /proc/meminfo (Linux); physical pages otherwise."""
    from ..utils import proc_status_bytes

    avail = proc_status_bytes("/proc/meminfo", "MemAvailable")
    return avail if avail is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def disk_free(path: str | Path) -> int:
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def anchor_training_bytes(anchor_params: int, shape, vocab: int, batch: int, seq_len: int,
                          fetched_params: int) -> int:
    """A rough upper estimate of what the anchor's training step needs on the accelerator (bf16 autocast, eager).

    Fitted to the anchor-alone peaks of `hmlm bench train` on an H100 (2026-11-26, eager): 160M at 8 and 16 x 2048
    19.8 / 36.6 GiB, 410M at 8 x 2048 25.3 GiB: weights, gradients and AdamW state at 16 bytes per parameter; ~20
    bytes per token per layer and model width of activations (24 here, for head-room); ~16 bytes per token per
    vocabulary entry for the head's chunked loss; the fetched memory per sample in fp32 (value, gradient and the
    per-sample copies, x3). The first calibration (70 bytes, at 33.9 GiB for 160M before the fused kernels) made
    `auto` put the whole 12.7B bank of the 410M configuration on the host. Set memory.device_budget_gb when this is
    off for your model.
    """
    tokens = batch * seq_len
    return int(16 * anchor_params + tokens * (24 * shape.n_layers * shape.d_model + 16 * vocab)
               + 12 * batch * fetched_params)


def plan_levels(levels: Sequence[LevelPlan], forced: list[str] | None, *, device_budget: int,
                host_budget: int) -> list[LevelPlan]:
    """Assign a tier to each level (in place; returns them). `forced` (one tier per level) skips the planning."""
    if forced is not None:
        for lp, tier in zip(levels, forced):
            lp.tier = tier
        return list(levels)
    dev, host = device_budget, host_budget
    # hottest share first; among equals the smaller level (more levels fit)
    for lp in sorted(levels, key=lambda lp: (-lp.touched, lp.bytes)):
        if lp.bytes <= dev:
            lp.tier, dev = "device", dev - lp.bytes
        elif lp.bytes <= host:
            lp.tier, host = "host", host - lp.bytes
        else:
            lp.tier = "disk"
    return list(levels)


def check_disk(levels: Sequence[LevelPlan], free: int) -> None:
    on_disk = sum(lp.bytes for lp in levels if lp.tier == "disk")
    if on_disk > free:
        raise TierError(f"the plan puts {on_disk / GiB:.1f} GiB of bank levels on disk but only {free / GiB:.1f} GiB "
                        f"are free under memory.disk_dir; plan: {describe(levels)}. Free disk space, point "
                        "memory.disk_dir elsewhere, use memory.optim_state=bf16|factored or a smaller bank")


def describe(levels: Sequence[LevelPlan]) -> str:
    return ", ".join(f"{lp.key}={lp.tier} ({lp.bytes / GiB:.2f} GiB)" for lp in levels)


def bytes_by_tier(levels: Sequence[LevelPlan]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for lp in levels:
        t = out.setdefault(lp.tier, {"param_bytes": 0, "state_bytes": 0})
        t["param_bytes"] += lp.param_bytes
        t["state_bytes"] += lp.state_bytes
    return out

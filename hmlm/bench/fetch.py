"""`hmlm bench fetch`: route and fetch latency of one memory per tier plan, cold, warm and with shallow levels cached.

One "memory" is what one prompt gets: its path through the tree (greedy descent over the router's centroids) and the
concatenation of its path's blocks, ready for the anchor (`store.fetch`, float32 on the compute device). The tree has
the recipe's shape with random centroids and the bank is filled with constants (the values change no cost); the
embedder is not timed (its cost does not depend on the bank).

    cold     a new prompt each time, nothing cached (disk levels read with O_DIRECT, or after evicting the file
             from the page cache)
    warm     the same prompt again and again (host rows in CPU caches / DRAM, disk rows re-read)
    cached   a stream of new prompts with an LRU of fetched blocks on the device (`memory.cache_mb`): shallow blocks
             recur across prompts (the paper's compositional reuse), the deepest level is read each time
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Recipe
from ..model import build_anchor, build_layout, build_store
from ..routers.hkmeans import HierarchicalKMeans


def random_tree(branching: int, levels: int, dim: int, seed: int) -> HierarchicalKMeans:
    tree = HierarchicalKMeans(branching, levels, seed=seed)
    rng = np.random.default_rng(seed)
    tree.dim = dim
    for lv in range(levels):
        c = rng.standard_normal((branching ** (lv + 1), dim)).astype(np.float32)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        tree.centroids.append(c)
        tree._c_sq.append((c * c).sum(1))
    return tree


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "mean": round(float(a.mean()), 3)}


def measure_tiers(recipe: Recipe, *, vocab_size: int, tiers: str, prompts: int, cache_mb: float,
                  device: torch.device, disk_dir: Path, seed: int = 0,
                  profile: Path | None = None) -> list[dict[str, Any]]:
    """Rows (cold, warm, cached) for one tier plan, e.g. `host` or `host,host,disk`; with `profile`, the warm
    prompt's fetch is also run under torch.profiler (hmlm.bench.profile: PROFILE/<tiers>.txt)."""
    spec: Any = tiers.split(",") if "," in tiers else tiers
    mem = replace(recipe.memory, store="tiered", tiers=spec, disk_dir=str(disk_dir), cache_mb=0.0)
    recipe = replace(recipe, memory=mem, trainer=replace(recipe.trainer, mode="memory"))
    anchor = build_anchor(recipe, vocab_size, device="meta")
    layout = build_layout(recipe, anchor)
    t0 = time.perf_counter()
    store = build_store(recipe, layout, init=False, training=True)
    store.to_compute(device)
    store.fill(0.01)
    _sync(device)
    fill_s = time.perf_counter() - t0
    tree = random_tree(layout.branching, len(layout.sizes), 384, seed)
    rng = np.random.default_rng(seed + 1)
    direct = all(getattr(getattr(lv, "storage", None), "io", None) is None or lv.storage.io.direct
                 for lv in store.levels.values() if lv.tier == "disk")

    def one(emb: np.ndarray) -> tuple[float, float]:
        a = time.perf_counter()
        paths = torch.from_numpy(tree.route(emb[None]))
        b = time.perf_counter()
        out = store.fetch(paths)
        _sync(device)
        c = time.perf_counter()
        assert next(iter(out.values())).shape[0] == 1
        return 1000 * (b - a), 1000 * (c - b)

    def phase(name: str, embs: list[np.ndarray], warmup: int = 0) -> dict[str, Any]:
        for e in embs[:warmup]:
            one(e)
        times = [one(e) for e in embs[warmup:]]
        route, fetch = [t[0] for t in times], [t[1] for t in times]
        return {"phase": name, "route_ms": _percentiles(route), "fetch_ms": _percentiles(fetch),
                "total_ms": _percentiles([r + f for r, f in zip(route, fetch)])}

    embs = [e for e in rng.standard_normal((3 * prompts + 1, 384)).astype(np.float32)]
    for lv in store.levels.values():
        if lv.tier == "disk" and hasattr(lv.storage.io, "drop_cache"):
            lv.storage.io.drop_cache()
    rows = [phase("cold", embs[:prompts]),
            phase("warm", [embs[prompts]] * (prompts + 3), warmup=3)]
    if profile is not None:
        from .profile import profile_steps

        rows[-1]["profile"] = profile_steps(lambda i: one(embs[prompts]), steps=10, device=device, out_dir=profile,
                                            name=f"fetch_{tiers}_{store.ops_used()['host_read'] or ''}")
    if store.cache is None and cache_mb > 0:
        from ..bank.stores import _BlockCache

        store.cache = _BlockCache(int(cache_mb * (1 << 20)))
        store.cache_keys = {f"l{lvl}" for lvl in layout.active_levels if lvl != max(layout.active_levels)}
    if store.cache is not None:
        rows.append(phase("cached", embs[prompts + 1:], warmup=prompts))
        rows[-1].update(cache_hits=store.cache.hits, cache_misses=store.cache.misses,
                        cache_mb=cache_mb)
    info = {"tiers": ",".join(store.tier_of(f"l{lvl}") for lvl in layout.active_levels),
            "fetched_params": layout.fetched_params(), "bank_params": layout.bank_params(),
            "fill_s": round(fill_s, 2), "direct_io": direct if "disk" in store.tiers.values() else None,
            "disk_io": store.ops_used()["disk_io"], "host_read": store.ops_used()["host_read"],
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    store.close()
    return [{**info, **r} for r in rows]


def default_cache_mb(recipe: Recipe, layout) -> float:
    """Room for every block of every level but the deepest (the shallow levels the paper's reuse argument is about)."""
    deepest = max(layout.active_levels)
    elt = 2 if recipe.memory.dtype == "bfloat16" else 4
    return sum(layout.level_params(lvl) * elt for lvl in layout.active_levels if lvl != deepest) / (1 << 20) + 1


def run_fetch_bench(recipe: Recipe, *, vocab_size: int, tiers: list[str], prompts: int, cache_mb: float | None,
                    disk_dir: Path, out: Path | None = None, profile: Path | None = None) -> list[dict[str, Any]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    anchor = build_anchor(recipe, vocab_size, device="meta")
    layout = build_layout(replace(recipe, trainer=replace(recipe.trainer, mode="memory")), anchor)
    cache = default_cache_mb(recipe, layout) if cache_mb is None else cache_mb
    rows = []
    for spec in tiers:
        rows += measure_tiers(recipe, vocab_size=vocab_size, tiers=spec, prompts=prompts, cache_mb=cache,
                              device=device, disk_dir=disk_dir, profile=profile)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return rows

"""The memory-augmented model: anchor + memory type + bank store, composed from the registry.

`MemoryLM` is what training and evaluation share. It is an nn.Module whose only parameters are the anchor's; the bank
is a store (not an nn.Module) so that data-parallel engines never touch it. `forward` takes the batch's tree paths and
a memory mode:

    fetched   each sequence gets the blocks on its own path (the paper's method)
    generic   each sequence gets the single context-free generic block (the paper's control)
    none      the anchor alone
"""
from __future__ import annotations

import threading
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from . import registry
from .bank.layout import BankLayout
from .bank.stores import BlockStore
from .config import Recipe
from .memories.placement import parse_placement
from .plugin_config import call_with_options, create
from .protocols import MemoryContext

# `hmlm eval` scores on two threads (hmlm.eval.lane), and a store's tiers, staging and LRU are not thread-safe: one
# fetch at a time per process (a module-level lock, so a model still pickles and deep-copies)
_FETCH_LOCK = threading.Lock()

MEMORY_MODES = ("fetched", "generic", "none")


class MemoryLM(nn.Module):
    def __init__(self, anchor: nn.Module, layout: BankLayout | None, store: BlockStore | None):
        super().__init__()
        self.anchor = anchor
        self.layout = layout
        self.store = store

    @property
    def has_memory(self) -> bool:
        return self.store is not None

    def memory_context(self, paths: torch.Tensor | None, mode: str, *, generic_mask: torch.Tensor | None = None,
                       grad: bool = False) -> MemoryContext | None:
        if mode not in MEMORY_MODES:
            raise ValueError(f"memory mode {mode!r}; expected one of {', '.join(MEMORY_MODES)}")
        if mode == "none" or self.store is None:
            return None
        if paths is None:
            raise ValueError(f"memory mode {mode!r} needs the batch's tree paths")
        if mode == "generic":
            generic_mask = torch.ones(paths.shape[0], dtype=torch.bool)
        # under autocast the memory comes in autocast's dtype, laid out for the anchor's layers (Store.fetch); a
        # store that predates `dtype` still works in float32 runs
        device = torch.device(getattr(self.store, "compute_device", "cpu"))
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        extra = {} if dtype is None else {"dtype": dtype}
        with _FETCH_LOCK:
            tensors = self.store.fetch(paths, generic_mask=generic_mask, grad=grad, **extra)
        assert self.layout is not None
        return MemoryContext(self.layout.memory, tensors, self.layout.layers)

    def forward(self, input_ids: torch.Tensor, *, paths: torch.Tensor | None = None, memory: str = "fetched",
                doc_ids: torch.Tensor | None = None, generic_mask: torch.Tensor | None = None,
                grad_memory: bool = False) -> torch.Tensor:
        ctx = self.memory_context(paths, memory, generic_mask=generic_mask, grad=grad_memory)
        return self.anchor(input_ids, memory=ctx, doc_ids=doc_ids)


def build_anchor(recipe: Recipe, vocab_size: int, *, device: str | torch.device = "cpu") -> nn.Module:
    with torch.device(device):
        return create("anchors", recipe, "from_config", recipe.anchor, vocab_size=vocab_size)


def build_layout(recipe: Recipe, anchor: nn.Module) -> BankLayout | None:
    sizes = tuple(recipe.memory.sizes) + (0,) * (recipe.index.router.levels - len(recipe.memory.sizes))
    if recipe.trainer.mode == "anchor" or sum(sizes) == 0:
        return None
    memory = build_memory_type(recipe)
    layers = parse_placement(recipe.memory.placement, anchor.shape.n_layers)
    assert layers is not None
    return BankLayout(memory=memory, shape=anchor.shape, sizes=sizes, branching=recipe.index.router.branching,
                      layers=tuple(layers))


def build_memory_type(recipe: Recipe, name: str | None = None):
    """The recipe's memory type (or the one called `name`, e.g. in `hmlm bench memory-types`) with its options."""
    if name is None or name == recipe.memory.type:
        return create("memories", recipe, None)
    # another type than the recipe's: the recipe's options belong to its own type, so this one gets its defaults
    return call_with_options(registry.get("memories", name), None, None, source="recipe", key="memory.options")


def plan_tiers(recipe: Recipe, layout: BankLayout, anchor: nn.Module | None = None, *,
               training: bool = True, check: bool = True) -> list:
    """Each bank level's tier and bytes (hmlm.bank.tiers) for this recipe on this machine."""
    from .bank.tiers import (GiB, LevelPlan, anchor_training_bytes, disk_free, host_memory_available, normalize_tiers,
                             plan_levels, state_bytes_per_param, check_disk)

    mem = recipe.memory
    elt = 2 if mem.dtype == "bfloat16" else 4
    per_state = state_bytes_per_param(mem.optim_state) if training else 0.0
    p_generic = mem.generic_prob if mem.generic_prob is not None else 1.0 / (recipe.index.router.branching + 1)
    batch = max(1.0, recipe.trainer.batch_size * (1 - (p_generic if mem.generic else 0.0)))
    levels = []
    for lvl, r in enumerate(layout.sizes):
        if r == 0:
            continue
        params = layout.level_params(lvl)
        levels.append(LevelPlan(f"l{lvl}", lvl + 1, layout.nodes(lvl), params, params * elt, int(params * per_state),
                                min(1.0, batch / layout.nodes(lvl))))
    forced = normalize_tiers(mem.store if mem.store in ("device", "host") else mem.tiers, list(mem.sizes))
    if forced is not None:  # layout.sizes pads memory.sizes with empty levels to the tree's depth
        forced = forced + ["device"] * (len(layout.sizes) - len(forced))
    forced_active = None if forced is None else [forced[lp.level - 1] for lp in levels]
    cuda = torch.cuda.is_available() and recipe.trainer.accelerator in ("auto", "gpu", "cuda")
    host = int(mem.host_budget_gb * GiB) if mem.host_budget_gb is not None else int(0.8 * host_memory_available())
    if mem.device_budget_gb is not None:
        device = int(mem.device_budget_gb * GiB)
    elif cuda:
        free = torch.cuda.mem_get_info()[0]
        anchor_params = sum(p.numel() for p in anchor.parameters()) if anchor is not None else 0
        vocab = getattr(getattr(anchor, "config", None), "vocab_size", 0) or 0
        need = anchor_training_bytes(anchor_params, layout.shape, vocab, recipe.trainer.batch_size,
                                     recipe.data.seq_len, layout.fetched_params()) if training else 2 * anchor_params
        device = max(0, free - need - 2 * GiB)
    elif recipe.trainer.accelerator in ("auto", "cpu"):
        device, host = host, 0   # training on the CPU: the device *is* host RAM, and staging would only copy
    else:
        device = 0               # an accelerator that is not here: plan as if it had no room (set the budget)
    plan_levels(levels, forced_active, device_budget=device, host_budget=host)
    if check and training and any(lp.tier == "disk" for lp in levels):
        check_disk(levels, disk_free(mem.disk_dir))
    if mem.generic and layout.total_rank > 0:
        params = layout.fetched_params()
        levels.append(LevelPlan("generic", None, 1, params, params * elt, int(params * per_state), 1.0, "device"))
    return levels


def build_store(recipe: Recipe, layout: BankLayout | None, *, init: bool = True, anchor: nn.Module | None = None,
                training: bool = True) -> BlockStore | None:
    if layout is None:
        return None
    cls = registry.get("stores", recipe.memory.store)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[recipe.memory.dtype]
    if not hasattr(cls, "from_recipe"):  # a third-party store written against the original constructor
        return create("stores", recipe, None, layout, generic=recipe.memory.generic, dtype=dtype, seed=recipe.seed,
                      init=init)
    plan = plan_tiers(recipe, layout, anchor, training=training)
    tiers = ["device"] * len(layout.sizes)
    for lp in plan:
        if lp.level is not None:
            tiers[lp.level - 1] = lp.tier
    store = create("stores", recipe, "from_recipe", layout, recipe.memory, seed=recipe.seed, init=init, tiers=tiers,
                   training=training)
    store.plan = plan
    return store


def build_model(recipe: Recipe, vocab_size: int, *, init_bank: bool = True) -> MemoryLM:
    """The model of a recipe. `init_bank=False` leaves the bank's values undrawn (a resume restores them, and a
    disk-tier level file is then reopened, not recreated)."""
    torch.manual_seed(recipe.seed)
    anchor = build_anchor(recipe, vocab_size)
    layout = build_layout(recipe, anchor)
    return MemoryLM(anchor, layout, build_store(recipe, layout, init=init_bank, anchor=anchor))


def size_report(recipe: Recipe, vocab_size: int) -> dict[str, Any]:
    """Parameter accounting without allocating anything (anchor on the meta device, bank from its layout)."""
    anchor = build_anchor(recipe, vocab_size, device="meta")
    layout = build_layout(recipe, anchor)
    report: dict[str, Any] = {
        "anchor_params": sum(p.numel() for p in anchor.parameters()),
        "fetched_params_per_sequence": layout.fetched_params() if layout else 0,
        "bank_params": layout.bank_params() if layout else 0,
        "generic_params": layout.fetched_params() if layout and recipe.memory.generic else 0,
        "anchor_shape": asdict(anchor.shape),
        "memory_layers": list(layout.layers) if layout else [],
        "bank_levels": [],
    }
    if layout:
        from .bank.tiers import disk_free

        plan = plan_tiers(recipe, layout, anchor, check=False)
        on_disk = sum(lp.bytes for lp in plan if lp.tier == "disk")
        if on_disk:
            report["disk_bytes_needed"], report["disk_bytes_free"] = on_disk, disk_free(recipe.memory.disk_dir)
        for lp in plan:
            if lp.level is None:
                continue
            report["bank_levels"].append({"level": lp.level, "r": layout.sizes[lp.level - 1], "nodes": lp.nodes,
                                          "params": lp.params, "bytes": lp.param_bytes, "state_bytes": lp.state_bytes,
                                          "tier": lp.tier, "touched_per_step": lp.touched})
    return report

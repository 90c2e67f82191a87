"""The memory-augmented model: anchor + memory type + bank store, composed from the registry.

`MemoryLM` is what training and evaluation share. It is an nn.Module whose only parameters are the anchor's; the bank
is a store (not an nn.Module) so that data-parallel engines never touch it. `forward` takes the batch's tree paths and
a memory mode:

    fetched   each sequence gets the blocks on its own path (the paper's method)
    generic   each sequence gets the single context-free generic block (the paper's control)
    none      the anchor alone
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from . import registry
from .bank.layout import BankLayout
from .bank.stores import BlockStore
from .config import Recipe
from .memories.placement import parse_placement
from .protocols import MemoryContext

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
        tensors = self.store.fetch(paths, generic_mask=generic_mask, grad=grad)
        assert self.layout is not None
        return MemoryContext(self.layout.memory, tensors, self.layout.layers)

    def forward(self, input_ids: torch.Tensor, *, paths: torch.Tensor | None = None, memory: str = "fetched",
                doc_ids: torch.Tensor | None = None, generic_mask: torch.Tensor | None = None,
                grad_memory: bool = False) -> torch.Tensor:
        ctx = self.memory_context(paths, memory, generic_mask=generic_mask, grad=grad_memory)
        return self.anchor(input_ids, memory=ctx, doc_ids=doc_ids)


def build_anchor(recipe: Recipe, vocab_size: int, *, device: str | torch.device = "cpu") -> nn.Module:
    cls = registry.get("anchors", recipe.anchor.name)
    with torch.device(device):
        return cls.from_config(recipe.anchor, vocab_size=vocab_size)


def build_layout(recipe: Recipe, anchor: nn.Module) -> BankLayout | None:
    sizes = tuple(recipe.memory.sizes) + (0,) * (recipe.index.router.levels - len(recipe.memory.sizes))
    if recipe.trainer.mode == "anchor" or sum(sizes) == 0:
        return None
    memory = registry.get("memories", recipe.memory.type)()
    layers = parse_placement(recipe.memory.placement, anchor.shape.n_layers)
    assert layers is not None
    return BankLayout(memory=memory, shape=anchor.shape, sizes=sizes, branching=recipe.index.router.branching,
                      layers=tuple(layers))


def build_store(recipe: Recipe, layout: BankLayout | None, *, init: bool = True) -> BlockStore | None:
    if layout is None:
        return None
    cls = registry.get("stores", recipe.memory.store)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[recipe.memory.dtype]
    return cls(layout, generic=recipe.memory.generic, dtype=dtype, seed=recipe.seed, init=init)


def build_model(recipe: Recipe, vocab_size: int) -> MemoryLM:
    torch.manual_seed(recipe.seed)
    anchor = build_anchor(recipe, vocab_size)
    layout = build_layout(recipe, anchor)
    return MemoryLM(anchor, layout, build_store(recipe, layout))


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
        elt = 2 if recipe.memory.dtype == "bfloat16" else 4
        for lvl, r in enumerate(layout.sizes):
            report["bank_levels"].append({"level": lvl + 1, "r": r, "nodes": layout.nodes(lvl),
                                          "params": layout.level_params(lvl),
                                          "bytes": layout.level_params(lvl) * elt,
                                          "tier": recipe.memory.store})
    return report

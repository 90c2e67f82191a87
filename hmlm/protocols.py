"""The contracts a plugin implements. Built-ins and third-party plugins implement the same ones.

Each plugin group of the registry (`hmlm.anchors`, `hmlm.memories`, `hmlm.routers`, `hmlm.embedders`,
`hmlm.stores`) maps a name to a class that follows one of the protocols below. The classes are plain
Python; nothing here depends on Lightning, so a model can be used without the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

# Memory sites an anchor exposes. A memory type names the sites it attaches to.
#   ffn      parallel to each SwiGLU FFN: delta(x_normed) is added to the FFN output
#   attn_q / attn_k / attn_v   added to the q/k/v projection outputs (input: the normed hidden state)
#   attn_o   added to the output projection's output (input: the concatenated head outputs)
#   attn_kv  extra key/value slots: delta(q) with q [B, H, T, dh] (before RoPE) is added to the
#            per-head attention output [B, H, T, dh] before the output projection
#   ffn_gate / ffn_up   added to the SwiGLU gate (w1) / up (w2) outputs (input: the FFN input, i.e. normed hidden)
#   ffn_down added to the SwiGLU down projection's (w3) output (input: the SwiGLU hidden [B, T, ffn_dim])
MEMORY_SITES = ("ffn", "attn_q", "attn_k", "attn_v", "attn_o", "attn_kv", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class AnchorShape:
    """What a memory type needs to know about an anchor to size its blocks."""

    n_layers: int
    d_model: int
    n_heads: int
    head_dim: int
    ffn_dim: int

    @property
    def attn_dim(self) -> int:
        return self.n_heads * self.head_dim


@dataclass(frozen=True)
class TensorSpec:
    """Shape of one tensor of a memory block of `r` units, and the axis that grows with r.

    Blocks of different tree levels are concatenated along `rank_axis` to form a sample's memory.
    `shape` excludes the leading node axis of the bank.
    """

    shape: tuple[int, ...]
    rank_axis: int


class MemoryContext:
    """The memory of one batch: a memory type, its per-sample fetched tensors, the layers it serves.

    `tensors[name]` has shape [B, *spec.shape] (already concatenated over levels). The anchor calls
    `delta(site, layer, x)` at each memory site; None means "nothing to add here".
    """

    def __init__(self, memory: "MemoryType", tensors: Mapping[str, torch.Tensor], layers: Sequence[int]):
        self.memory = memory
        self.tensors = dict(tensors)
        # map anchor layer index -> position in the layer axis of the fetched tensors
        self.layer_slot = {layer: i for i, layer in enumerate(layers)}

    def delta(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        slot = self.layer_slot.get(layer)
        if slot is None or site not in self.memory.sites:
            return None
        return self.memory.apply(site, slot, x, self.tensors)


@runtime_checkable
class Anchor(Protocol):
    """A backbone: an nn.Module whose forward accepts a MemoryContext.

    forward(input_ids [B,T], *, memory=None, doc_ids=None) -> logits [B,T,V]. `doc_ids` ([B,T] ints,
    the document index inside a packed sequence) turns on per-document causal attention.

    Optionally an anchor offers a key/value cache: `new_cache()` returns an object with `length` and `repeat(n)`,
    and `forward(..., cache=c)` lets the new tokens attend to every cached position, then appends them to `c`
    (see hmlm.anchors.openlm.KVCache). Callers test for `new_cache` and fall back to full forwards without it.
    """

    shape: AnchorShape

    def forward(self, input_ids: torch.Tensor, *, memory: MemoryContext | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor: ...


class MemoryType(Protocol):
    """How one memory block looks and acts. Stateless: the bank holds the tensors."""

    sites: tuple[str, ...]

    def block_spec(self, shape: AnchorShape, r: int, n_layers: int) -> dict[str, TensorSpec]:
        """Tensors of one block with r units serving `n_layers` layers (layer axis first)."""

    def init_block(self, tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
        """Initialise in place (leading node axis) so that the memory has no effect at step 0."""

    def apply(self, site: str, slot: int, x: torch.Tensor, fetched: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample delta for `site` at layer slot `slot`; batched over samples, no Python loop."""


class Embedder(Protocol):
    """Text -> L2-normalised float32 vectors [N, dim]."""

    dim: int
    name: str

    def embed(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray: ...

    def identity(self) -> dict[str, Any]:
        """What identifies this embedder's vector space (stored in the index; checked at load)."""


class Router(Protocol):
    """A tree over embedding space; `route` maps vectors to one node id per level."""

    branching: int
    levels: int

    def fit(self, embeddings: np.ndarray, *, progress: bool = False) -> "Router": ...

    def route(self, embeddings: np.ndarray, *, blocked: Sequence[tuple[int, int]] = ()) -> np.ndarray:
        """[N, levels] int64 global node ids per level (level l ids are in [0, branching**(l+1)))."""

    def save(self, path: Path) -> None: ...

    @classmethod
    def load(cls, path: Path) -> "Router": ...


class Store(Protocol):
    """Holds the memory bank's blocks for every level and updates them lazily."""

    def fetch(self, paths: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def step(self, lr: float) -> dict[str, float]: ...


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

"""The contracts a plugin implements. Built-ins and third-party plugins implement the same ones.

Each plugin group of the registry (`hmlm.anchors`, `hmlm.memories`, `hmlm.routers`, `hmlm.embedders`,
`hmlm.stores`) maps a name to a class that follows one of the protocols below. The classes are plain
Python; nothing here depends on Lightning, so a model can be used without the trainer.

Common to every kind:
- Options: a plugin may declare a dataclass `Options` (class attribute). The recipe's `options:` mapping beside the
  plugin's name is validated against it when the recipe is loaded and the typed instance is passed as the keyword
  argument `options=` of the constructor (memories) or factory (everything else). See hmlm/plugin_config.py.
- API version: a plugin may declare `hmlm_plugin_api = PLUGIN_API`; the registry refuses another value.
- `hmlm.testing` holds a conformance kit for each kind; the built-ins pass it in hmlm's own tests.
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
# The plugin API these contracts describe; raised when a contract changes incompatibly.
PLUGIN_API = 2

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


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's where autocast is on for x's device, else x's own. Memory types cast
    their fetched tensors to it (`w.to(compute_dtype(x))`): under autocast the fetch already delivers that dtype, so
    the cast is free, where `.to(x.dtype)` would turn bf16 weights into float32 for autocast to turn back."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class MemoryContext:
    """The memory of one batch: a memory type, its per-sample fetched tensors, the layers it serves.

    `tensors[name]` has shape [B, *spec.shape] (already concatenated over levels). The anchor calls
    `delta(site, layer, x)` at each memory site; None means "nothing to add here". The memory type's `apply` gets
    the tensors of that layer's slot, [B, *spec.shape[1:]].
    """

    def __init__(self, memory: "MemoryType", tensors: Mapping[str, torch.Tensor], layers: Sequence[int]):
        self.memory = memory
        self.tensors = dict(tensors)
        # map anchor layer index -> position in the layer axis of the fetched tensors
        self.layer_slot = {layer: i for i, layer in enumerate(layers)}
        # Split along the layer axis once per batch. Indexing t[:, slot] at every layer instead would make autograd
        # allocate a zero gradient of the whole [B, L, ...] tensor per layer and add them up (L full-size fills and
        # adds per tensor per step: ~15% of a 160M + memory step on an H100); unbind's backward is one stack.
        self.slots = {name: t.unbind(1) for name, t in self.tensors.items()}

    def delta(self, site: str, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        slot = self.layer_slot.get(layer)
        if slot is None or site not in self.memory.sites:
            return None
        return self.memory.apply(site, slot, x, {name: t[slot] for name, t in self.slots.items()})


@runtime_checkable
class Anchor(Protocol):
    """A backbone: an nn.Module whose forward accepts a MemoryContext.

    forward(input_ids [B,T], *, memory=None, doc_ids=None) -> logits [B,T,V]. `doc_ids` ([B,T] ints,
    the document index inside a packed sequence) turns on per-document causal attention.

    Optionally an anchor offers a key/value cache: `new_cache()` returns an object with `length` and `repeat(n)`,
    and `forward(..., cache=c)` lets the new tokens attend to every cached position, then appends them to `c`
    (see hmlm.anchors.openlm.KVCache). Callers test for `new_cache` and fall back to full forwards without it. A cache
    with `select(rows)` (a cache of those batch rows) lets a decoder drop finished rows; an anchor that sets the class
    attribute `cache_doc_ids = True` takes `doc_ids` together with `cache=` (padding = -1; tokens without ids continue
    each row's last document), so prompts of different lengths decode left-padded in one batch (hmlm.generate).

    An anchor whose forward keeps no state on the module between calls (memory and cache only as arguments) may set
    the class attribute `concurrent_forward = True`: `hmlm eval` then runs the held-out perplexity on a second thread
    while the tasks run (hmlm.eval.lane). Without it (e.g. `hf`, whose memory hooks read the batch's memory from the
    module) every forward stays on one thread.
    """

    shape: AnchorShape

    def forward(self, input_ids: torch.Tensor, *, memory: MemoryContext | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class MemoryType(Protocol):
    """How one memory block looks and acts. Stateless: the bank holds the tensors.

    Construction: `MemoryType()`, or `MemoryType(options=Options(...))` for a type that declares `Options`.

    Guarantees the bank and the anchors rely on (checked by `hmlm.testing.MemoryTypeTests`):
    - `sites` is a subset of MEMORY_SITES; the anchor calls `apply` only for those.
    - `block_spec(shape, r, n)`: every tensor has the layer axis first (length n) and grows linearly along its
      `rank_axis` (size r there, every other axis independent of r), because a sample's memory is the
      concatenation of its path's blocks along that axis: block(r1) ++ block(r2) has the shape of block(r1 + r2).
    - `init_block` fills tensors with a leading node axis [nodes, *shape] in place, deterministically from
      `generator`, such that `apply` returns zeros (the model starts as its anchor) while gradients can still reach
      at least one tensor.
    - `apply(site, slot, x, fetched)`: `fetched[name]` is the tensor of layer slot `slot`, [B, *spec.shape[1:]]
      (the layer axis removed; API 2 -- API 1 passed [B, *spec.shape] and left `[:, slot]` to the type), in the
      step's compute dtype (autocast's under autocast, else float32; cast with `.to(compute_dtype(x))` inside). Returns the delta with the site's output shape ([B, T, d_model]
      for ffn, attn_o, attn_q/k/v; [B, H, T, head_dim] for attn_kv; see MEMORY_SITES). Sample i's delta depends only
      on x[i] and the fetched tensors of sample i; batched over samples with no Python loop over them.
    """

    sites: tuple[str, ...]

    def block_spec(self, shape: AnchorShape, r: int, n_layers: int) -> dict[str, TensorSpec]:
        """Tensors of one block with r units serving `n_layers` layers (layer axis first)."""

    def init_block(self, tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
        """Initialise in place (leading node axis) so that the memory has no effect at step 0."""

    def apply(self, site: str, slot: int, x: torch.Tensor, fetched: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample delta for `site` at layer slot `slot`; batched over samples, no Python loop."""


@runtime_checkable
class Embedder(Protocol):
    """Text -> L2-normalised float32 vectors [N, dim] (checked by `hmlm.testing.EmbedderTests`).

    Construction: `Embedder.from_config(cfg: hmlm.config.EmbedderConfig, *, seed: int[, options=...])`.
    `embed` is deterministic (the same texts give the same vectors, in order, whatever the batch split) and
    returns float32 rows of unit L2 norm; an empty list gives [0, dim]. `identity()` is a JSON-serialisable dict
    that changes whenever the vector space does (model, width, seed); it is stored in index.json.
    """

    dim: int
    name: str

    def embed(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray: ...

    def identity(self) -> dict[str, Any]:
        """What identifies this embedder's vector space (stored in the index; checked at load)."""


@runtime_checkable
class Router(Protocol):
    """A tree over embedding space; `route` maps vectors to one node id per level.

    Construction: `Router.from_config(cfg: hmlm.config.RouterConfig, *, seed: int[, options=...])`; `cfg.branching`
    (k) and `cfg.levels` (L) are the tree's shape, the router's other knobs belong in its `Options`.
    Guarantees (checked by `hmlm.testing.RouterTests`):
    - Node ids are global per level and 0-based: level l (0-based, l = 0 are the root's children) has ids in
      [0, k**(l+1)); the children of node p of level l are p*k + j, j in [0, k), at level l+1. So a path is valid
      iff path[l+1] // k == path[l], and a bank level holds k**(l+1) blocks.
    - `fit(embeddings [N, dim] float32)` returns self; with the same seed and embeddings it builds the same tree.
    - `route(embeddings, blocked=...)` returns int64 [N, L], a pure function of the fitted state. `blocked` holds
      (level, node) pairs with 0-BASED levels (the CLI's `blocked:<level>:<node>` is 1-based; the eval adapter
      converts); a blocked node is never returned: descent takes the best unblocked sibling. When every child of a
      node is blocked, route raises ValueError. A (level, node) outside the tree raises ValueError.
    - `save(path)` receives the FILE path `<index dir>/tree.safetensors` (its folder exists) and writes exactly that
      file, atomically; `Router.load(path)` (classmethod) reads it back into a router that routes identically. The
      file is listed in the index's checksums and copied into model directories.
    - `name` (the registry name) and `fit_stats` (a JSON-serialisable dict, {} allowed; stored in index.json).
    """

    name: str
    branching: int
    levels: int
    fit_stats: dict[str, Any]

    def fit(self, embeddings: np.ndarray, *, progress: bool = False) -> "Router": ...

    def route(self, embeddings: np.ndarray, *, blocked: Sequence[tuple[int, int]] = ()) -> np.ndarray:
        """[N, levels] int64 global node ids per level (level l ids are in [0, branching**(l+1)))."""

    def save(self, path: Path) -> None: ...

    @classmethod
    def load(cls, path: Path) -> "Router": ...


@runtime_checkable
class Store(Protocol):
    """Holds the memory bank's blocks for every level and updates them lazily (hmlm.bank.stores.TieredStore).

    Construction: `Store.from_recipe(layout, memory_cfg, *, seed, init, tiers, training[, options=...])`; a store
    without `from_recipe` is called as `Store(layout, generic=, dtype=, seed=, init=[, options=])`. Subclassing
    TieredStore (e.g. to change `updater`, the per-row optimizer) is the easy way to write one.
    Bank keys are `l{level}` (0-based tree level, only levels with r > 0) and `generic`; a key's rows are the level's
    nodes in global node-id order, one flat row of `format_of(key).numel` values per node.
    Guarantees (checked by `hmlm.testing.StoreTests`):
    - `fetch(paths [B, L] int64 CPU, generic_mask=None, grad=False, dtype=None)` returns {tensor name: [B,
      *spec(R)]} on the compute device in `dtype` (float32 when None; the model passes autocast's dtype under
      autocast), sample i's blocks of its path concatenated along the rank axis (or the generic block where
      generic_mask[i]). With grad=True the blocks are leaves; after backward, `fetched_grads()` lists
      (key, local rows, grad [U, P]) per level and `replace_fetched_grads` swaps them (subtree-parallel reduction).
    - `step(lr=, weight_decay=, ...)` updates exactly the fetched rows; every other row is bit-identical.
      `discard_fetched()` drops the pending gradients without an update.
    - `read_rows(key, rows)` / `write_rows(key, rows, values)` read and overwrite rows; `state_dict()` /
      `load_state_dict()`, `save(dir)` / `load(dir)` and `save_checkpoint(dir, step)` / `load_checkpoint(dir,
      manifest)` round-trip the values (and the optimizer state, for the checkpoint) exactly.
    """

    def keys(self) -> list[str]: ...

    def format_of(self, key: str) -> Any: ...

    def nodes(self, key: str) -> int: ...

    def tier_of(self, key: str) -> str: ...

    @property
    def has_generic(self) -> bool: ...

    def to_compute(self, device: torch.device | str) -> "Store": ...

    def fetch(self, paths: torch.Tensor, *, generic_mask: torch.Tensor | None = None,
              grad: bool = False, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]: ...

    def prefetch(self, paths: torch.Tensor, *, with_state: bool = True) -> None: ...

    def fetched_grads(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]: ...

    def replace_fetched_grads(self, groups: Sequence[tuple[str, torch.Tensor, torch.Tensor]]) -> None: ...

    def discard_fetched(self) -> None: ...

    def step(self, *, lr: float, weight_decay: float, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
             grad_clip: float = 0.0, grad_norm: torch.Tensor | None = None) -> Any: ...

    def read_rows(self, key: str, rows: Any = None, *, with_state: bool = False) -> Any: ...

    def write_rows(self, key: str, rows: Any, values: torch.Tensor) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def save(self, directory: Path) -> dict[str, dict]: ...

    def load(self, directory: Path, *, digests: dict[str, dict] | None = None) -> None: ...

    def save_checkpoint(self, directory: Path, step: int) -> dict: ...

    def load_checkpoint(self, directory: Path, manifest: dict) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class AnchorPlugin(Protocol):
    """The class side of an anchor plugin (the instance follows `Anchor`), checked by `hmlm.testing.AnchorTests`.

    `AnchorPlugin.from_config(cfg: hmlm.config.AnchorConfig, *, vocab_size: int[, options=...])` builds the module
    (under `torch.device(...)` when the caller wants it on the meta device or an accelerator). The instance has
    `shape` (AnchorShape) and `config.vocab_size`, and at every layer calls `memory.delta(site, layer, x)` for the
    sites it supports, adding a non-None result to that site's output; with a memory whose deltas are all zero its
    logits equal those of `forward(input_ids, memory=None)`. `sites` (optional, on the instance) lists the sites it
    calls; default: all of MEMORY_SITES.
    """

    @classmethod
    def from_config(cls, cfg: Any, *, vocab_size: int) -> nn.Module: ...


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

"""Hierarchical LoRA memories (paper §2.2, App. I): a fetched low-rank patch W + α·B·A on groups of projections.

Three variants, each a separate registered memory type:

    lora-qk    query and key projections            sites attn_q, attn_k          2·r·L·(d + h·d_h) per unit of r
    lora-vo    value and output projections         sites attn_v, attn_o          2·r·L·(d + h·d_h)
    lora-ffn   the three SwiGLU matrices            sites ffn_gate, ffn_up, ffn_down   3·r·L·(d + d_f)

Layout. For a projection d_in -> d_out a block of r units holds, per memory layer, A [d_in, r] and B [r, d_out], so
the delta is α · (x·A)·B. A's rank axis is its last, B's its first: concatenating the path's blocks along r gives
A = [A_1 … A_L] and B = [B_1; …; B_L], and x·A·B = Σ_l x·A_l·B_l. The fetched memory is *exactly* one wider LoRA of
rank R = Σ r_l, the LoRA analogue of the FFN memory's wider inner dimension.

Scaling. The paper reports "α = 2 worked best". PEFT's usual α/r would make the scale depend on the concatenated rank
R, which differs between configs, between levels of one path, and between a path and the generic block of the same
size — so a level's block would act differently depending on what it is concatenated with. We use the fixed scale α
(= 2) on B·A instead: every unit of rank contributes on the same scale whatever the configuration.

Initialisation. B = 0, so the memory has no effect at step 0 (bit-exactly: the delta is a sum of exact zeros); A is
Kaiming-uniform as in PEFT (`kaiming_uniform_(a=√5)` on the [r, d_in] matrix: U(-1/√d_in, 1/√d_in)), drawn from the
store's seeded generator so that banks are reproducible.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from ..protocols import AnchorShape, TensorSpec, compute_dtype


def kaiming_uniform_bound(fan_in: int) -> float:
    """The bound of torch.nn.init.kaiming_uniform_(w, a=√5) for a weight with fan-in `fan_in` (PEFT's LoRA A)."""
    gain = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    return gain * math.sqrt(3.0 / fan_in)


class LoRAMemory:
    """Base class. A subclass names its sites, the tensor prefix of each (`prefixes`) and their widths."""

    sites: tuple[str, ...] = ()
    prefixes: dict[str, str] = {}
    alpha = 2.0

    def widths(self, shape: AnchorShape) -> dict[str, tuple[int, int]]:
        """(input width, output width) of the projection patched at each site."""
        raise NotImplementedError(f"{type(self).__name__} must define widths(shape)")

    def block_spec(self, shape: AnchorShape, r: int, n_layers: int) -> dict[str, TensorSpec]:
        spec: dict[str, TensorSpec] = {}
        for site, (d_in, d_out) in self.widths(shape).items():
            prefix = self.prefixes[site]
            spec[f"{prefix}_a"] = TensorSpec((n_layers, d_in, r), rank_axis=2)
            spec[f"{prefix}_b"] = TensorSpec((n_layers, r, d_out), rank_axis=1)   # zero at init
        return spec

    def init_block(self, tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
        for name in sorted(tensors):   # sorted: the draws do not depend on dict order
            t = tensors[name]
            if name.endswith("_a"):
                bound = kaiming_uniform_bound(t.shape[-2])      # [nodes, layers, d_in, r]: fan-in is d_in
                torch.nn.init.uniform_(t, -bound, bound, generator=generator)
            else:
                t.zero_()

    def apply(self, site: str, slot: int, x: torch.Tensor, fetched: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # x [B, T, d_in]; per-sample A [B, d_in, R], B [B, R, d_out] -> two batched matmuls, no loop over samples
        prefix = self.prefixes[site]
        a = fetched[f"{prefix}_a"].to(compute_dtype(x))
        b = fetched[f"{prefix}_b"].to(compute_dtype(x))
        return torch.matmul(torch.matmul(x, a), b) * self.alpha


class LoRAQKMemory(LoRAMemory):
    """LoRA on the query and key projections (x = the attention-normed hidden state)."""

    sites = ("attn_q", "attn_k")
    prefixes = {"attn_q": "q", "attn_k": "k"}

    def widths(self, shape: AnchorShape) -> dict[str, tuple[int, int]]:
        return {"attn_q": (shape.d_model, shape.attn_dim), "attn_k": (shape.d_model, shape.attn_dim)}


class LoRAVOMemory(LoRAMemory):
    """LoRA on the value projection (x = normed hidden state) and the output projection (x = head outputs)."""

    sites = ("attn_v", "attn_o")
    prefixes = {"attn_v": "v", "attn_o": "o"}

    def widths(self, shape: AnchorShape) -> dict[str, tuple[int, int]]:
        return {"attn_v": (shape.d_model, shape.attn_dim), "attn_o": (shape.attn_dim, shape.d_model)}


class LoRAFFNMemory(LoRAMemory):
    """LoRA on the SwiGLU gate and up (x = FFN input) and down (x = the SwiGLU hidden) matrices."""

    sites = ("ffn_gate", "ffn_up", "ffn_down")
    prefixes = {"ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}

    def widths(self, shape: AnchorShape) -> dict[str, tuple[int, int]]:
        d, f = shape.d_model, shape.ffn_dim
        return {"ffn_gate": (d, f), "ffn_up": (d, f), "ffn_down": (f, d)}

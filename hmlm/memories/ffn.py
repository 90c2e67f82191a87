"""Hierarchical FFN memories (the paper's choice, §1.3): extra SwiGLU neurons in every memory layer.

A block of r units holds, for each of its layers, gate M1 (d x r), up M2 (d x r) and down M3 (r x d). A sample's
memory is the concatenation of its path's blocks along r, so the FFN of every memory layer becomes
    FFN(x) + M3 · (SiLU(M1 · x) ⊙ M2 · x),
i.e. a small parallel SwiGLU whose width is r_1 + ... + r_L. M3 starts at zero, so at step 0 the model is the anchor.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from ..protocols import AnchorShape, TensorSpec, compute_dtype
from .init import trunc_normal_


class FFNMemory:
    sites = ("ffn",)
    init_std = 0.02

    def block_spec(self, shape: AnchorShape, r: int, n_layers: int) -> dict[str, TensorSpec]:
        d = shape.d_model
        return {
            "w1": TensorSpec((n_layers, d, r), rank_axis=2),  # gate
            "w2": TensorSpec((n_layers, d, r), rank_axis=2),  # up
            "w3": TensorSpec((n_layers, r, d), rank_axis=1),  # down, zero at init
        }

    def init_block(self, tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
        # paper: gate/up truncated normal, down zeros (no effect at step 0)
        for name in ("w1", "w2"):
            std = self.init_std
            trunc_normal_(tensors[name], std=std, a=-2 * std, b=2 * std, generator=generator)
        tensors["w3"].zero_()

    def apply(self, site: str, slot: int, x: torch.Tensor, fetched: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # x [B, T, d]; per-sample weights [B, d, R] -> batched matmuls, one per tensor, no loop over samples
        w1, w2, w3 = fetched["w1"], fetched["w2"], fetched["w3"]
        dt = compute_dtype(x)
        h = F.silu(torch.matmul(x, w1.to(dt))) * torch.matmul(x, w2.to(dt))
        return torch.matmul(h, w3.to(dt))


"""Product-key memories (Lample et al. 2019, "Large Memory Layers with Product Keys"; Berges et al. 2024, "Memory
Layers at Scale") as an hmlm memory type, so that the peer baseline can be compared with FFN memories in hmlm.

Each unit of a block is one product-key head: two sets of `subkeys` sub-keys (one per half of the query) whose
Cartesian product addresses `subkeys**2` value vectors. For a token x (the normed hidden state, split in halves
q1, q2) a head scores both halves against its sub-keys, keeps the `knn` best of each, scores the knn x knn products
(s1[i] + s2[j]) and reads the `knn` best values with softmax weights: the exact top-knn of all subkeys**2 keys,
found with 2 x subkeys + knn**2 dot products instead of subkeys**2 (the product-key trick). The memory output is the
sum over the sample's heads, added to the FFN output of every memory layer (site `ffn`), like an FFN memory.

Hierarchy comes for free: a block of r units holds r heads and a sample's memory is the concatenation of its path's
heads (every tensor's rank axis is the head axis). Values start at zero, so the model starts as its anchor.

Differences from the papers, on purpose: the query is the normed hidden state itself (no query network or batch
norm: a per-head projection would dominate the block size), and values are per head rather than shared.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from hmlm.protocols import PLUGIN_API, AnchorShape, TensorSpec, compute_dtype

__version__ = "0.1.0"


class ProductKeyMemory:
    hmlm_plugin_api = PLUGIN_API
    sites = ("ffn",)

    @dataclass
    class Options:
        subkeys: int = 4         # sub-keys per query half; a head addresses subkeys**2 values
        knn: int = 4             # values read per head and token (top-k of each half, then of their products)
        init_std: float = 0.02   # truncated-normal std of the sub-keys (values start at zero)

        def __post_init__(self) -> None:
            if self.subkeys < 2:
                raise ValueError(f"subkeys must be >= 2, got {self.subkeys}")
            if not 1 <= self.knn <= self.subkeys:
                raise ValueError(f"knn must be in [1, subkeys={self.subkeys}], got {self.knn}")
            if not self.init_std > 0:
                raise ValueError(f"init_std must be > 0, got {self.init_std}")

    def __init__(self, options: "ProductKeyMemory.Options | None" = None):
        self.options = options or self.Options()

    def block_spec(self, shape: AnchorShape, r: int, n_layers: int) -> dict[str, TensorSpec]:
        d, n = shape.d_model, self.options.subkeys
        if d % 2:
            raise ValueError(f"pkm: the query is split in halves, so d_model must be even (got {d})")
        return {"keys1": TensorSpec((n_layers, r, n, d // 2), rank_axis=1),
                "keys2": TensorSpec((n_layers, r, n, d // 2), rank_axis=1),
                "values": TensorSpec((n_layers, r, n * n, d), rank_axis=1)}

    def init_block(self, tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
        std = self.options.init_std
        for name in ("keys1", "keys2"):
            torch.nn.init.trunc_normal_(tensors[name], std=std, a=-2 * std, b=2 * std, generator=generator)
        tensors["values"].zero_()  # no effect at step 0: the model starts as its anchor

    def apply(self, site: str, slot: int, x: torch.Tensor, fetched: Mapping[str, torch.Tensor]) -> torch.Tensor:
        n, knn = self.options.subkeys, self.options.knn
        dt = compute_dtype(x)
        k1, k2 = fetched["keys1"].to(dt), fetched["keys2"].to(dt)  # [B, R, n, d/2]
        values = fetched["values"].to(dt)                          # [B, R, n*n, d]
        B, R = k1.shape[:2]
        half = k1.shape[-1]
        # sub-key scores of every head: [B, T, R, n] per half (one batched matmul each, no loop over samples)
        s1 = torch.einsum("bth,brnh->btrn", x[..., :half], k1)
        s2 = torch.einsum("bth,brnh->btrn", x[..., half:], k2)
        v1, i1 = s1.topk(knn, dim=-1)
        v2, i2 = s2.topk(knn, dim=-1)
        cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)                    # [B, T, R, knn*knn]
        best, pos = cand.topk(knn, dim=-1)
        index = i1.gather(-1, pos // knn) * n + i2.gather(-1, pos % knn)          # value ids in [0, n*n)
        weights = torch.softmax(best, dim=-1)
        # a sparse read as one dense matmul: the weights scattered into [B, T, R * n*n]
        dense = torch.zeros(*weights.shape[:-1], n * n, dtype=x.dtype, device=x.device).scatter(-1, index, weights)
        return torch.matmul(dense.flatten(-2), values.reshape(B, R * n * n, -1))   # [B, T, d]

"""Hierarchical KV memories (paper §2.2, App. I): learned key/value slots that every query attends to.

A block of r units holds, per memory layer, r keys and r values for every head: keys [r, h·d_h], values [r, h·d_h]
(fetched size 2·r·L·h·d_h per unit, as in the paper). A sample's memory is the concatenation of its path's blocks
along r, so each query attends over all R = Σ r_l slots of the path in one softmax. At the `attn_kv` site the anchor
passes q [B, H, T, d_h] after QK-norm and before RoPE; the memory returns, per head,

    softmax(q · K^T / √d_h) · V        (no causal mask and no positional encoding over the slots, as in the paper)

which the anchor adds to the attention output before the output projection: a generalised prefix tuning whose
slots are separate from, not mixed into, the sequence's own softmax.

Initialisation: values are zero, so the memory adds exactly zero at step 0 whatever the softmax weights are (with
several levels concatenated the softmax runs over all R slots, and a convex combination of zero vectors is still
zero); keys are truncated normal with the anchor's init std (0.02, cut at 2 std), the paper giving no std.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from ..protocols import AnchorShape, TensorSpec, compute_dtype
from .init import trunc_normal_


class KVMemory:
    sites = ("attn_kv",)
    init_std = 0.02

    def block_spec(self, shape: AnchorShape, r: int, n_layers: int) -> dict[str, TensorSpec]:
        a = shape.attn_dim
        return {
            "keys": TensorSpec((n_layers, r, a), rank_axis=1),
            "values": TensorSpec((n_layers, r, a), rank_axis=1),   # zero at init
        }

    def init_block(self, tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
        std = self.init_std
        trunc_normal_(tensors["keys"], std=std, a=-2 * std, b=2 * std, generator=generator)
        tensors["values"].zero_()

    def apply(self, site: str, slot: int, x: torch.Tensor, fetched: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # x = q [B, H, T, dh]; per-sample slots [B, R, H*dh] -> [B, H, R, dh]; one batched attention, no mask
        B, H, T, dh = x.shape
        keys = fetched["keys"].to(compute_dtype(x))
        values = fetched["values"].to(compute_dtype(x))
        R = keys.shape[1]
        keys = keys.reshape(B, R, H, dh).transpose(1, 2)
        values = values.reshape(B, R, H, dh).transpose(1, 2)
        return F.scaled_dot_product_attention(x, keys, values)   # default scale 1/√dh, no mask

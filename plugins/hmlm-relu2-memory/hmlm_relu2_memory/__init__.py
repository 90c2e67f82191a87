"""A memory type shipped outside hmlm: FFN memories whose extra neurons use ReLU(x)^2 (Primer) instead of SwiGLU.

Only the contract of hmlm.protocols.MemoryType is used: `sites`, `block_spec`, `init_block`, `apply`. Blocks of the
path are concatenated along each tensor's rank axis by the bank, so hierarchical sizes come for free.
"""
from __future__ import annotations

from typing import Mapping

import torch

from hmlm.protocols import PLUGIN_API, AnchorShape, TensorSpec, compute_dtype

__version__ = "0.1.0"


class ReLU2Memory:
    hmlm_plugin_api = PLUGIN_API  # the plugin API this class is written for (the registry checks it)
    sites = ("ffn",)
    init_std = 0.02

    def block_spec(self, shape: AnchorShape, r: int, n_layers: int) -> dict[str, TensorSpec]:
        d = shape.d_model
        return {"up": TensorSpec((n_layers, d, r), rank_axis=2), "down": TensorSpec((n_layers, r, d), rank_axis=1)}

    def init_block(self, tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
        std = self.init_std
        torch.nn.init.trunc_normal_(tensors["up"], std=std, a=-2 * std, b=2 * std, generator=generator)
        tensors["down"].zero_()  # no effect at step 0: the model starts as its anchor

    def apply(self, site: str, slot: int, x: torch.Tensor, fetched: Mapping[str, torch.Tensor]) -> torch.Tensor:
        up, down = fetched["up"].to(compute_dtype(x)), fetched["down"].to(compute_dtype(x))
        return torch.matmul(torch.relu(torch.matmul(x, up)).square(), down)  # [B,T,d] per-sample batched matmuls

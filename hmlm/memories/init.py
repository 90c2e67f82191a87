"""Initialisers shared by the memory types."""
from __future__ import annotations

import torch


def trunc_normal_(t: torch.Tensor, *, std: float, a: float, b: float, generator: torch.Generator) -> torch.Tensor:
    """Fill `t` from N(0, std^2) truncated to [a, b] (the distribution of torch.nn.init.trunc_normal_ with mean 0).

    By rejection: draw normals and redraw the values outside [a, b] until none is (4.6% at +-2 std, then 4.6% of
    those, ...). torch's inverse-CDF version runs erfinv over every value and is ~30x slower on a CPU, which is what
    drawing a multi-billion-parameter bank costs.
    """
    flat = t.view(-1) if t.is_contiguous() else t.reshape(-1).clone()
    flat.normal_(0.0, std, generator=generator)
    idx = ((flat < a) | (flat > b)).nonzero().squeeze(1)
    while len(idx):
        redo = torch.empty(len(idx), dtype=flat.dtype, device=flat.device).normal_(0.0, std, generator=generator)
        flat[idx] = redo
        idx = idx[(redo < a) | (redo > b)]
    if flat.data_ptr() != t.data_ptr():
        t.copy_(flat.view_as(t))
    return t

"""Lazy, block-wise AdamW on the rows a step fetched, for all levels at once.

A level's fetched rows arrive as one [U, P] buffer each (values, gradient, moments), so the update of every row of
every level is a short sequence of `torch._foreach_*` calls over the levels' buffers: a few kernels per step, not a
Python loop over tensors. Each row keeps its own step count, so bias correction, moments and the decoupled weight
decay advance only when that block is fetched; rows not passed in are never read or written.

Optimizer state kinds (`memory.optim_state`):
    fp32      m and v in float32 (8 bytes per parameter, exact AdamW)
    bf16      m and v stored in bfloat16, updated in float32 and rounded to nearest (4 bytes per parameter)
    factored  m in bfloat16; v factored per matrix as in Adafactor (row and column means of g^2, v ~ r c^T / mean(r)):
              ~2 bytes per parameter. 1-D tensors keep a full v.
How far each drifts from fp32 AdamW on a small problem is asserted in tests/test_bank_optim.py (docs/design.md §6).

`RowUpdater` is the seam for other kernels on the compute device: the store hands it the groups of one step and the
clip scale; `lazy_adamw` is the default. Host-tier rows can instead be updated in place in host RAM by DeepSpeed's CPU
Adam (`memory.host_update: cpu_adam`, cpu_adam.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from .rows import RowFormat


@dataclass(frozen=True)
class AdamHyper:
    lr: float
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class UpdateGroup:
    """The fetched rows of one level, all float32 on one device; updated in place."""

    fmt: RowFormat
    params: torch.Tensor      # [U, P]
    grad: torch.Tensor        # [U, P]
    m: torch.Tensor           # [U, P]
    v: torch.Tensor           # [U, P], or [U, F] factored statistics
    steps: torch.Tensor       # [U] each row's update count including this step


class RowUpdater(Protocol):
    def __call__(self, groups: Sequence[UpdateGroup], hyper: AdamHyper, scale: torch.Tensor | None) -> None: ...


@torch.no_grad()
def lazy_adamw(groups: Sequence[UpdateGroup], hyper: AdamHyper, scale: torch.Tensor | None = None) -> None:
    """AdamW on every group's rows; `scale` (a 0-dim tensor, e.g. the clip factor) multiplies the gradients first."""
    if not groups:
        return
    b1, b2 = hyper.beta1, hyper.beta2
    ps = [g.params for g in groups]
    gs = [g.grad for g in groups]
    ms = [g.m for g in groups]
    if scale is not None:
        torch._foreach_mul_(gs, scale)
    torch._foreach_mul_(ms, b1)
    torch._foreach_add_(ms, gs, alpha=1 - b1)
    t = [g.steps.to(torch.float32).unsqueeze(1) for g in groups]
    bias1 = [1 - torch.pow(b1, x) for x in t]
    bias2 = [1 - torch.pow(b2, x) for x in t]
    dense = [i for i, g in enumerate(groups) if g.fmt.optim_state != "factored"]
    denom: list[torch.Tensor] = [None] * len(groups)  # type: ignore[list-item]
    if dense:
        vs = [groups[i].v for i in dense]
        gd = [gs[i] for i in dense]
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gd, gd, value=1 - b2)
        dd = torch._foreach_div(vs, [bias2[i] for i in dense])
        torch._foreach_sqrt_(dd)
        torch._foreach_add_(dd, hyper.eps)
        for i, d in zip(dense, dd):
            denom[i] = d
    for i, g in enumerate(groups):
        if denom[i] is None:
            denom[i] = _factored_denom(g, b2, bias2[i], hyper.eps)
    if hyper.weight_decay:
        torch._foreach_mul_(ps, 1 - hyper.lr * hyper.weight_decay)
    upd = torch._foreach_div(ms, bias1)
    torch._foreach_div_(upd, denom)
    torch._foreach_add_(ps, upd, alpha=-hyper.lr)


def _factored_denom(g: UpdateGroup, b2: float, bias2: torch.Tensor, eps: float) -> torch.Tensor:
    """Update the row/column statistics of every matrix of the rows and return sqrt(v_hat / bias2) + eps [U, P]."""
    u = g.grad.shape[0]
    denom = torch.empty_like(g.grad)
    for p in g.fmt.pieces:
        gp = g.grad[:, p.offset:p.offset + p.numel].view(u, *p.shape)
        out = denom[:, p.offset:p.offset + p.numel].view(u, *p.shape)
        g2 = gp.square().add_(1e-30)
        if p.factored:
            lead, a, b = p.shape[:-2], p.shape[-2], p.shape[-1]
            r = g.v[:, p.f_rows:p.f_rows + (p.f_cols - p.f_rows)].view(u, *lead, a)
            c = g.v[:, p.f_cols:p.f_rows + p.f_numel].view(u, *lead, b)
            r.mul_(b2).add_(g2.mean(-1), alpha=1 - b2)
            c.mul_(b2).add_(g2.mean(-2), alpha=1 - b2)
            vhat = r.unsqueeze(-1) * c.unsqueeze(-2) / r.mean(-1, keepdim=True).unsqueeze(-1).clamp_min(1e-30)
        else:
            vhat = g.v[:, p.f_rows:p.f_rows + p.f_numel].view(u, *p.shape)
            vhat.mul_(b2).add_(g2, alpha=1 - b2)
        bias = bias2.view(u, *([1] * len(p.shape)))
        torch.div(vhat, bias, out=out)
        out.sqrt_().add_(eps)
    return denom

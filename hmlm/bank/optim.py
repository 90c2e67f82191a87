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
clip scale (host-tier rows can instead be updated in place in host RAM by DeepSpeed's CPU Adam:
`memory.host_update: cpu_adam`, cpu_adam.py). `lazy_adamw` is the float32 reference: every group's rows in float32, a dozen
`_foreach` passes over them. `fused_adamw` is the default: it takes the moments in their storage dtypes (the updater
marks this with `storage_dtypes = True`) and updates each dense group in one pass -- on CUDA one kernel from
torch.compile that reads values, gradient and moments once and writes them once, instead of ~20 full passes in
float32 (68 ms of a 413 ms step at 160M + 4.6B bank, batch 16, on an H100; docs/benchmarks.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

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
    """The fetched rows of one level on one device; updated in place. All float32, unless the updater has
    `storage_dtypes = True`: then values and moments come in their storage dtypes and the gradient in the compute
    dtype (bf16 under bf16 autocast), and the updater computes in float32 and rounds into them."""

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


def bias_corrections(steps: torch.Tensor, b1: float, b2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's bias corrections 1 - b^t of each row's step count, [U, 1] float32.

    Computed for all U rows at once, even where the update then goes in chunks: a CPU pow runs vectorised over the
    body of a tensor and in scalar code over its tail, and the two may round differently, so a chunked computation
    would change the results with the chunking."""
    t = steps.to(torch.float32).unsqueeze(1)
    return 1 - torch.pow(b1, t), 1 - torch.pow(b2, t)


def _adamw_math_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, bias1: torch.Tensor,
                 bias2: torch.Tensor, lr: torch.Tensor, scale: torch.Tensor, b1: float, b2: float, eps: float,
                 wd: float) -> None:
    g32 = g.float() * scale
    m32 = m.float() * b1 + g32 * (1 - b1)
    v32 = v.float() * b2 + g32 * g32 * (1 - b2)
    new = p.float() * (1 - lr * wd) - lr * (m32 / bias1) / ((v32 / bias2).sqrt() + eps)
    p.copy_(new)
    m.copy_(m32)
    v.copy_(v32)


def _row_adamw_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, steps: torch.Tensor,
                lr: torch.Tensor, scale: torch.Tensor, b1: float, b2: float, eps: float, wd: float) -> None:
    """AdamW of rows [U, P] in place, math in float32, results rounded into p, m and v's own dtypes. `lr` and
    `scale` are 0-dim tensors so that a compiled version neither recompiles as the schedule moves nor syncs."""
    _adamw_math_(p, g, m, v, *bias_corrections(steps, b1, b2), lr, scale, b1, b2, eps, wd)


# CPU: float32 elements of the rows updated at a time. The update's ~10 float32 temporaries of a whole level's rows
# (tens of MB at the quickstart) would be mapped and page-faulted afresh by every step; a chunk's stay in cache.
# 2^17 measured fastest of 2^14..2^19 on the 2-core CPU (the quickstart's bank update 130 -> 47 ms; benchmarks.md).
CPU_CHUNK_ELEMENTS = 1 << 17


def cpu_chunk_rows(width: int) -> int:
    """Rows of `width` values updated at a time on the CPU."""
    return max(1, CPU_CHUNK_ELEMENTS // max(width, 1))


def _row_adamw_chunked_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, steps: torch.Tensor,
                        lr: torch.Tensor, scale: torch.Tensor, b1: float, b2: float, eps: float, wd: float) -> None:
    """`_row_adamw_` a few rows at a time (the CPU path): bit for bit the same results, elementwise math on slices."""
    bias1, bias2 = bias_corrections(steps, b1, b2)
    per = cpu_chunk_rows(p.shape[1])
    for a in range(0, p.shape[0], per):
        rows = slice(a, a + per)
        _adamw_math_(p[rows], g[rows], m[rows], v[rows], bias1[rows], bias2[rows], lr, scale, b1, b2, eps, wd)


_COMPILED: dict[str, Callable] = {}


def _row_adamw_for(device: torch.device) -> Callable:
    """The eager function in cache-sized chunks on the CPU (no compiler needed, tests run it); one torch.compile'd
    kernel on CUDA, with dynamic shapes since the number of fetched rows changes every step."""
    if device.type != "cuda":
        return _row_adamw_chunked_
    if "cuda" not in _COMPILED:
        _COMPILED["cuda"] = torch.compile(_row_adamw_, dynamic=True, fullgraph=True)
    return _COMPILED["cuda"]


@torch.no_grad()
def fused_adamw(groups: Sequence[UpdateGroup], hyper: AdamHyper, scale: torch.Tensor | None = None) -> None:
    """`lazy_adamw` with the moments in their storage dtypes: each dense group in one pass (one kernel on CUDA);
    factored groups go through `lazy_adamw` on float32 copies of their moments."""
    dense = [g for g in groups if g.fmt.optim_state != "factored"]
    factored = [g for g in groups if g.fmt.optim_state == "factored"]
    if dense:
        # the step's scalars as device tensors, made once (a Python float would recompile the kernel as lr moves)
        dev = dense[0].params.device
        lr = torch.full((), hyper.lr, dtype=torch.float32, device=dev)
        s = scale.to(dev, torch.float32) if scale is not None else torch.ones((), dtype=torch.float32, device=dev)
        update = _row_adamw_for(dev)
        for g in dense:
            update(g.params, g.grad, g.m, g.v, g.steps, lr, s, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay)
    if factored:
        # float32 copies where a tensor is stored narrower (.float() of a float32 tensor is the tensor itself)
        wide = [UpdateGroup(g.fmt, g.params.float(), g.grad.float(), g.m.float(), g.v.float(), g.steps)
                for g in factored]
        lazy_adamw(wide, hyper, scale)
        for g, w in zip(factored, wide):
            for dst, src in ((g.params, w.params), (g.m, w.m), (g.v, w.v)):
                if src is not dst:
                    dst.copy_(src)


fused_adamw.storage_dtypes = True  # type: ignore[attr-defined]
# a store may update a dense group of device-tier rows in place with indexed_adamw.indexed_adamw_: the same math,
# without gathering the moments out and copying everything back (an updater without this attribute gets [U, P] groups)
fused_adamw.in_place_rows = True  # type: ignore[attr-defined]

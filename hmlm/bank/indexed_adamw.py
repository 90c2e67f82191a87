"""The lazy AdamW of a device-tier level's fetched rows, read and written in place in the level's own tensors.

The general path (optim.fused_adamw) updates [U, P] buffers: the moments are gathered out of the level first and the
values, moments and all are copied back after, so a bf16 row costs ~34 bytes of traffic per value. On a device-tier
level nothing has to move: one kernel reads each fetched row's values, moments and gradient at their place and
writes the values and moments back there, ~14 bytes per value (the row's gradient [U, P] is the only buffer). At
the 160M + 4.6B shape, batch 16, that is most of the bank update's 5.8 ms per step on an H100 (docs/benchmarks.md).

`indexed_adamw_` is the entry: a Triton kernel on CUDA, the same math in torch ops elsewhere (the CPU, and the
reference the CUDA test compares the kernel with). `TRITON_INTERPRET=1` runs the kernel on CPU tensors where Triton
is installed. The bias corrections of each row's step count are computed once per row in torch, as optim's reference
does, so the kernel and the reference differ only in the rounding of a few float32 operations.
"""
from __future__ import annotations

import functools

import torch

from .optim import AdamHyper, _adamw_math_, bias_corrections, cpu_chunk_rows
from .uva import interpreting

BLOCK = 2048      # values of a row one program updates
NUM_WARPS = 8


@functools.lru_cache(maxsize=1)
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def adamw_rows(P, M, V, G, rows, bias1, bias2, lr_ptr, scale_ptr, width, b1, b2, eps, wd,
                   BLOCK: tl.constexpr):
        u = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < width
        at = tl.load(rows + u).to(tl.int64) * width + cols      # the row's place in the level
        gat = u.to(tl.int64) * width + cols                       # its gradient's place in [U, P]
        lr = tl.load(lr_ptr)
        s = tl.load(scale_ptr)
        c1 = tl.load(bias1 + u)
        c2 = tl.load(bias2 + u)
        g = tl.load(G + gat, mask=keep, other=0.0).to(tl.float32) * s
        m = tl.load(M + at, mask=keep, other=0.0).to(tl.float32) * b1 + g * (1 - b1)
        v = tl.load(V + at, mask=keep, other=0.0).to(tl.float32) * b2 + g * g * (1 - b2)
        p = tl.load(P + at, mask=keep, other=0.0).to(tl.float32)
        new = p * (1 - lr * wd) - lr * tl.div_rn(tl.div_rn(m, c1), tl.sqrt_rn(tl.div_rn(v, c2)) + eps)
        tl.store(P + at, new.to(P.dtype.element_ty), mask=keep)
        tl.store(M + at, m.to(M.dtype.element_ty), mask=keep)
        tl.store(V + at, v.to(V.dtype.element_ty), mask=keep)

    return triton, adamw_rows


def available(device: torch.device) -> bool:
    """Whether the kernel runs for tensors on `device` (CUDA with Triton, or Triton's interpreter)."""
    return _kernel() is not None and (device.type == "cuda" or interpreting())


def _reference_(P, M, V, rows, grad, steps, lr, scale, hyper: AdamHyper) -> None:
    """The same update in torch ops: optim's row AdamW math on the gathered rows, written back with index_copy_, a
    few rows at a time (optim.cpu_chunk_rows: the temporaries stay in cache; the results do not depend on it)."""
    b1, b2 = hyper.beta1, hyper.beta2
    bias1, bias2 = bias_corrections(steps, b1, b2)
    per = cpu_chunk_rows(P.shape[1]) if P.device.type == "cpu" else rows.numel()
    for a in range(0, rows.numel(), per):
        at, part = rows[a:a + per], slice(a, a + per)
        p, m, v = P.index_select(0, at), M.index_select(0, at), V.index_select(0, at)
        _adamw_math_(p, grad[part], m, v, bias1[part], bias2[part], lr, scale, b1, b2, hyper.eps, hyper.weight_decay)
        P.index_copy_(0, at, p)
        M.index_copy_(0, at, m)
        V.index_copy_(0, at, v)


@torch.no_grad()
def indexed_adamw_(params: torch.Tensor, m: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor,
                   steps: torch.Tensor, hyper: AdamHyper, scale: torch.Tensor | None = None,
                   *, use_kernel: bool | None = None) -> None:
    """AdamW of the level rows `rows` ([U] distinct ints on the level's device) in place in `params`, `m`, `v`
    ([N, P] each, any float dtypes; m and v dense, as optim_state fp32 or bf16 keeps them), from `grad` [U, P] and
    each row's update count `steps` [U] including this step. `scale` (0-dim, e.g. the clip factor) multiplies the
    gradient. No host synchronisation. `use_kernel=False` forces the torch reference."""
    if params.dim() != 2 or m.shape != params.shape or v.shape != params.shape:
        raise ValueError(f"indexed_adamw_: params {tuple(params.shape)}, m {tuple(m.shape)}, v {tuple(v.shape)} "
                         "must be [N, P] alike (factored moments take optim.fused_adamw)")
    if grad.shape != (rows.numel(), params.shape[1]):
        raise ValueError(f"indexed_adamw_: grad {tuple(grad.shape)} for {rows.numel()} rows of width "
                         f"{params.shape[1]}")
    if rows.numel() == 0:
        return
    dev = params.device
    lr = torch.full((), hyper.lr, dtype=torch.float32, device=dev)
    s = scale.to(dev, torch.float32) if scale is not None else torch.ones((), dtype=torch.float32, device=dev)
    kernel = _kernel()
    if use_kernel is False or kernel is None or (dev.type != "cuda" and not interpreting()):
        _reference_(params, m, v, rows, grad, steps.to(dev), lr, s, hyper)
        return
    t = steps.to(dev, torch.float32)
    bias1 = 1 - torch.pow(hyper.beta1, t)
    bias2 = 1 - torch.pow(hyper.beta2, t)
    triton, adamw_rows = kernel
    for name, x in (("params", params), ("m", m), ("v", v), ("grad", grad)):
        if not x.is_contiguous():
            raise ValueError(f"indexed_adamw_: {name} must be contiguous")
    width = params.shape[1]
    grid = (triton.cdiv(width, BLOCK), rows.numel())   # a row's blocks on axis 0: no 65,535 limit
    adamw_rows[grid](params, m, v, grad, rows, bias1, bias2, lr, s, width, hyper.beta1, hyper.beta2, hyper.eps,
                     hyper.weight_decay, BLOCK=BLOCK, num_warps=NUM_WARPS)

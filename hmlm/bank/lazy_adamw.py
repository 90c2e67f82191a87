"""Lazy, block-wise AdamW for memory blocks.

A bank level is a tensor [nodes, ...]; one step touches only the rows (blocks) that were fetched. Each block keeps its
own step count, so bias correction, the moments and the decoupled weight decay advance only when that block is
fetched. Rows not passed in are never read or written, so they stay bit-identical.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def lazy_adamw_update(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, steps: torch.Tensor,
                      rows: torch.Tensor, grad: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float, advance_steps: bool = True,
                      compute_device: torch.device | None = None) -> None:
    """Update `param[rows]` with `grad` ([len(rows), ...]); `steps[rows]` counts each block's own updates.

    `advance_steps=False` lets several tensors of one block share the block's step counter (the caller advances
    it once, with the first tensor). With `compute_device` the fetched rows and their state travel there for the
    arithmetic and back (a host-resident bank updated on the GPU); only those rows move.
    """
    store = param.device
    dev = compute_device or store
    rows_store = rows.to(store)
    if advance_steps:
        steps.index_add_(0, rows.to(steps.device), torch.ones_like(rows, dtype=steps.dtype, device=steps.device))
    t = steps.index_select(0, rows.to(steps.device)).to(device=dev, dtype=torch.float32)
    t = t.view(-1, *([1] * (param.dim() - 1)))
    g = grad.to(device=dev, dtype=torch.float32)
    p = param.index_select(0, rows_store).to(dev, non_blocking=True).float()
    m = exp_avg.index_select(0, rows_store).to(dev, non_blocking=True).mul_(beta1).add_(g, alpha=1 - beta1)
    v = exp_avg_sq.index_select(0, rows_store).to(dev, non_blocking=True).mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias1 = 1 - beta1 ** t
    bias2 = 1 - beta2 ** t
    p.mul_(1 - lr * weight_decay)
    p.sub_(lr * (m / bias1) / ((v / bias2).sqrt_().add_(eps)))
    param.index_copy_(0, rows_store, p.to(param.dtype).to(store))
    exp_avg.index_copy_(0, rows_store, m.to(store))
    exp_avg_sq.index_copy_(0, rows_store, v.to(store))

"""`trainer.strategy: ddp`: the anchor under Lightning's DDPStrategy, with its gradient reduction set by `trainer.ddp`.

* `grad_reduce: bf16` halves the bytes of the anchor's gradient all-reduce. It is a DDP communication hook (torch's
  `bf16_compress_hook`: each bucket is cast to bf16, divided by the world size, summed across ranks and cast back into
  the fp32 bucket), so the optimizer still sees fp32 gradients; only the sum loses precision (8 mantissa bits, one
  rounding per ring step). DDP takes exactly one comm hook, and subtree runs already count the anchor's bytes with one,
  so counting and compression are one hook (`anchor_allreduce_hook`) whose counter records the bytes actually sent.
* `bucket_mb` is DDP's `bucket_cap_mb` (buckets are sized in fp32 gradient bytes; under bf16 each sends half that).
* `bucket_view` is DDP's `gradient_as_bucket_view`: the parameters' `.grad` are views into the buckets, which saves a
  gradient-sized buffer and the copy from the buckets back into `.grad` after the last bucket is reduced, on the
  critical path at the end of backward. Nothing in hmlm detaches or replaces an anchor gradient in place
  (`zero_grad(set_to_none=True)` is what DDP's documentation asks for), so it is on by default.

The hook is registered by `HMLMModule.on_fit_start` rather than through Lightning's `ddp_comm_hook` argument: Lightning
registers hooks on CUDA only, and the CPU tests (gloo) must run the same code. gloo all-reduces bf16 tensors as well
(`ProcessGroupGloo` has a BFloat16 case), so the tests exercise the real compression.
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import DDPConfig, Recipe

__all__ = ["anchor_allreduce_hook", "build_ddp_strategy", "ddp_kwargs", "register_anchor_hook"]

# the dtype each trainer.ddp.grad_reduce value puts on the wire (None: the gradient's own dtype)
WIRE_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def ddp_kwargs(cfg: DDPConfig) -> dict[str, Any]:
    """DistributedDataParallel's keyword arguments for `trainer.ddp` (the same for `hmlm fit` and `hmlm bench
    scaling`)."""
    return {"bucket_cap_mb": float(cfg.bucket_mb), "gradient_as_bucket_view": bool(cfg.bucket_view)}


def build_ddp_strategy(recipe: Recipe):
    """Lightning's DDPStrategy with `trainer.ddp`'s buckets. Under `trainer.data_parallel=subtree` a module with no
    trainable parameter (a frozen anchor, trainer.mode=memory) is not wrapped: plain DDP refuses such a module, and
    there is nothing of the anchor to all-reduce."""
    from lightning.pytorch.strategies import DDPStrategy

    kwargs = ddp_kwargs(recipe.trainer.ddp)
    if recipe.trainer.data_parallel != "subtree":
        return DDPStrategy(**kwargs)

    class SubtreeDDPStrategy(DDPStrategy):
        def configure_ddp(self) -> None:
            if any(p.requires_grad for p in self.model.parameters()):
                super().configure_ddp()

    return SubtreeDDPStrategy(**kwargs)


def anchor_allreduce_hook(state, bucket):  # unannotated: DDP rejects the string annotations of this module
    """DDP comm hook (state: hmlm.train.affine.CommCounter, bucket: dist.GradBucket): DDP's mean all-reduce of one
    bucket of the anchor's gradients, in bf16 when `state.anchor_reduce == "bf16"`, counting the bytes sent."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buf = bucket.buffer()
    wire = WIRE_DTYPES[state.anchor_reduce] or buf.dtype
    state.anchor_bytes += buf.numel() * wire.itemsize
    state.anchor_calls += 1
    if wire != buf.dtype:
        return default_hooks.bf16_compress_hook(None, bucket)  # type: ignore[arg-type]
    return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]


def register_anchor_hook(ddp: torch.nn.parallel.DistributedDataParallel, cfg: DDPConfig, counter=None):
    """Register the anchor's one comm hook on `ddp`, or none where DDP's built-in fp32 all-reduce does the job.

    `counter` (a CommCounter; subtree runs keep one per rank for rank.json) makes the hook count even in fp32. Returns
    the counter the hook writes to, or None when no hook was registered."""
    from .affine import CommCounter

    if counter is None and WIRE_DTYPES[cfg.grad_reduce] is None:
        return None
    counter = counter if counter is not None else CommCounter()
    counter.anchor_reduce = cfg.grad_reduce
    ddp.register_comm_hook(counter, anchor_allreduce_hook)
    return counter

"""`memory.host_update: cpu_adam`: host-tier rows updated in place in host RAM by DeepSpeed's CPU Adam kernel.

The default path (`gpu`) stages a host row *with its moments* to the device, updates it there (optim.lazy_adamw) and
writes row and moments back: 3x the row's values in each direction per update with fp32 moments. With `cpu_adam` only
the values travel to the device (for the forward) and only the gradient comes back; the kernel (`ds_opt_adam
.adam_update`, AVX-vectorised, OpenMP over the host's cores) then updates the row and its moments where they live.

Same algorithm as lazy_adamw: AdamW with decoupled weight decay, bias correction by each row's own update count
(one kernel call per row, passing its step), the clip factor applied to the gradient before it leaves the device.
The kernel has an fp32-parameter variant only with fp32 moments, and its bf16 variants take bf16 gradients; so rows
stored in bf16 or with bf16 moments are widened to fp32 for the call and rounded back to nearest, as the GPU path
rounds them -- the result equals lazy_adamw's within float32 rounding (tests/test_bank_ds.py). The factored second
moment has no kernel here: that combination is refused (memory.host_update, memory.optim_state).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

from .dsops import load_op
from .optim import AdamHyper

if TYPE_CHECKING:
    from .levels import TensorStorage

HOST_UPDATE = ("auto", "gpu", "cpu_adam")
_IDS = threading.Lock()


def _new_optimizer_id() -> int:
    """An id no DeepSpeedCPUAdam of this process uses (the kernel keeps its optimizers in a table by id)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    with _IDS:
        opt_id = DeepSpeedCPUAdam.optimizer_id
        DeepSpeedCPUAdam.optimizer_id += 1
    return opt_id


def resolve_host_update(host_update: str, optim_state: str) -> str:
    """`auto` -> the default path; refuses what the kernel cannot do, naming the keys."""
    if host_update not in HOST_UPDATE:
        raise ValueError(f"memory.host_update: {host_update!r}; expected one of {', '.join(HOST_UPDATE)}")
    if host_update == "auto":
        return "gpu"
    if host_update == "cpu_adam" and optim_state == "factored":
        raise ValueError("memory.host_update=cpu_adam needs full AdamW moments (DeepSpeed's CPU Adam kernel); "
                         "memory.optim_state=factored works with memory.host_update=gpu, or use optim_state fp32|bf16")
    return host_update


class HostAdam:
    """DeepSpeed's CPU Adam kernel over rows of a host-RAM level (TensorStorage), in place."""

    def __init__(self):
        self.op = load_op("cpu_adam")
        self.id = _new_optimizer_id()
        # the hyper-parameters given here are replaced on every call (adam_update passes them)
        self.op.create_adam(self.id, 1e-3, 0.9, 0.999, 1e-8, 0.0, True, False)

    @torch.no_grad()
    def update_rows(self, storage: "TensorStorage", rows: torch.Tensor, grad: torch.Tensor, steps: torch.Tensor,
                    fresh: torch.Tensor, hyper: AdamHyper) -> None:
        """AdamW on storage rows `rows` [U] with gradients grad [U, P] (float32, CPU, clip factor applied) and each
        row's update count including this one, steps [U]; `fresh` [U] marks rows whose moments start at zero."""
        storage._alloc_state()
        exact = storage.params.dtype == storage.m.dtype == storage.v.dtype == torch.float32
        for i, (r, step) in enumerate(zip(rows.tolist(), steps.tolist())):
            p, m, v = storage.params[r], storage.m[r], storage.v[r]   # contiguous row views: updated in place
            if fresh[i]:
                m.zero_()
                v.zero_()
            if not exact:
                p, m, v = p.float(), m.float(), v.float()
            self.op.adam_update(self.id, int(step), hyper.lr, hyper.beta1, hyper.beta2, hyper.eps,
                                hyper.weight_decay, True, p, grad[i], m, v)
            if not exact:   # round to nearest, as the GPU path does when it writes the rows back
                storage.params[r].copy_(p)
                storage.m[r].copy_(m)
                storage.v[r].copy_(v)

    def close(self) -> None:
        if self.op is not None:
            self.op.destroy_adam(self.id)
            self.op = None

    def __del__(self):
        try:
            self.close()
        except Exception:   # interpreter shutdown
            pass

"""Stop (or skip a batch) on a non-finite loss or gradient, and never save or export a non-finite model.

Where the check runs, and what it costs (`trainer.nonfinite`):

* `skip: 0` (default): after every backward the loss and the gradient norms are folded into a device-side
  "first bad step" scalar with no host sync. It is read on the host every `trainer.log_every` steps (where Lightning
  already syncs to log), before every checkpoint is written and at the end of training. So a NaN at step s stops the
  run at the next log step at the latest, names step s, and no checkpoint or model is written after it.
* `skip: N`: the same value is read on the host after every backward (one sync per step, which only this mode pays),
  and a bad batch is dropped before any optimizer sees it (`HMLMModule.skip_update`), up to N times in the run.

Before a checkpoint and before the export every weight is also checked (anchor parameters and every bank tensor the
store checkpoints), so a non-finite value that a loss check could miss (a block no recent batch fetched) is caught
too. Under data parallelism every decision is reduced over the ranks, so all ranks stop together.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from .errors import NonFiniteError


def _grads_finite(module: Any) -> torch.Tensor | None:
    """One device scalar: every anchor gradient and the fetched bank blocks' gradient norm are finite."""
    grads = [p.grad for p in module.model.anchor.parameters() if p.grad is not None]
    parts = []
    if grads:
        parts.append(torch.stack(torch._foreach_norm(grads)).sum())
    store = module.model.store
    norm_fn = getattr(store, "fetched_grad_norm", None)
    if norm_fn is not None:
        parts.append(norm_fn().to(parts[0].device if parts else module.device))
    if not parts:
        return None
    return torch.isfinite(torch.stack([p.float() for p in parts]).sum())


def first_nonfinite_weight(module: Any) -> str | None:
    """The name of the first anchor parameter or bank tensor holding a NaN/inf (None when all are finite)."""
    named = [(f"anchor.{n}", p) for n, p in module.model.anchor.named_parameters()]
    if module.model.store is not None:
        named += [(f"bank.{k}", t) for k, t in _flat_tensors(module.model.store.state_dict())]
    # one host sync for the whole model, then a search only when something is wrong
    flags = [torch.isfinite(t).all() for _, t in named if t.is_floating_point() and t.numel()]
    if not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):
        return None
    for name, t in named:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _flat_tensors(state: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(state, torch.Tensor):
        return [(prefix, state)]
    if isinstance(state, dict):
        return [item for k, v in state.items() for item in _flat_tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    return []


class NonFiniteGuard(Callback):
    def __init__(self, *, skip: int, check_every: int, source: str, datamodule: Any = None, console: Any = None):
        self.console = console
        self.skip = skip
        self.check_every = check_every
        self.source = source
        self.datamodule = datamodule  # told about skipped batches, so a resumed stream starts where this one was
        self.skipped: list[int] = []  # global steps whose batch was dropped (checkpointed)
        self._first_bad: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None

    # -------------------------------------------------------------- per step (no host sync unless skip > 0)
    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def on_after_backward(self, trainer, pl_module) -> None:
        finite = torch.isfinite(self._loss) if self._loss is not None else None
        grads = _grads_finite(pl_module)
        if grads is not None:
            finite = grads if finite is None else finite & grads.to(finite.device)
        if finite is None:
            return
        step = trainer.global_step
        if self.skip > 0:
            bad = trainer.strategy.reduce_boolean_decision(not bool(finite), all=False)
            if bad:
                self._skip(trainer, pl_module, step)
            return
        if self._first_bad is None or self._first_bad.device != finite.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=finite.device)
        self._first_bad = torch.where((self._first_bad < 0) & ~finite, torch.full_like(self._first_bad, step),
                                      self._first_bad)

    def _skip(self, trainer, pl_module, step: int) -> None:
        if len(self.skipped) >= self.skip:
            raise NonFiniteError(self._message(f"a non-finite loss or gradient at step {step}, after skipping "
                                               f"{len(self.skipped)} batch(es) at steps {self.skipped}",
                                               trainer, raise_skip=True))
        self.skipped.append(step)
        pl_module.skip_update = True
        if self.datamodule is not None:
            self.datamodule.skipped_batches = len(self.skipped)
        if self.console is not None and trainer.is_global_zero:
            self.console.print(f"[yellow]fit[/] non-finite loss or gradient at step {step}: batch skipped, no update "
                               f"({len(self.skipped)}/{self.skip} allowed by trainer.nonfinite.skip)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.skip == 0 and trainer.global_step % self.check_every == 0:
            self.check(trainer, pl_module, weights=False)

    # -------------------------------------------------------------- before anything is written
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self.check(trainer, pl_module, weights=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer, pl_module, weights=True)

    def check(self, trainer, pl_module, *, weights: bool) -> None:
        reason = None
        if self._first_bad is not None and (bad := int(self._first_bad)) >= 0:
            reason = f"a non-finite loss or gradient at step {bad}"
        if reason is None and weights and (name := first_nonfinite_weight(pl_module)) is not None:
            reason = f"a non-finite value in {name} at step {trainer.global_step}"
        if trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
            raise NonFiniteError(self._message(reason or "a non-finite value on another rank", trainer))

    def _message(self, reason: str, trainer, raise_skip: bool = False) -> str:
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        kept = (f"the last good checkpoint is {ckpt}" if ckpt and Path(ckpt).is_file()
                else "no checkpoint of this run was written")
        hint = ("raise trainer.nonfinite.skip to skip more bad batches, or lower optim.anchor.lr / optim.memory.lr"
                if raise_skip else "lower optim.anchor.lr / optim.memory.lr (or raise warmup_steps), or set "
                "trainer.nonfinite.skip=N to skip up to N bad batches")
        return (f"{self.source}: training stopped: {reason}. Nothing was saved after it and no model was exported; "
                f"{kept}. Keys: {hint}")

    # -------------------------------------------------------------- checkpointed state
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = [int(s) for s in state_dict.get("skipped", [])]
        if self.datamodule is not None:
            self.datamodule.skipped_batches = len(self.skipped)

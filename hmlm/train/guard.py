"""Stop (or skip a batch) on a non-finite loss or gradient, and never save or export a non-finite model.

Where the checks run, and what they cost (`trainer.nonfinite`):

* `skip: 0` (default): every step the loss's finiteness is folded into a device-side "first bad step" scalar (two tiny
  kernels, no host sync). That scalar is read on the host every `trainer.log_every` steps (where Lightning already
  syncs to log), before every checkpoint is written and at the end of training: a NaN loss at step s stops the run
  at the next log step at the latest, names step s, and nothing is written after it. Gradients are not inspected
  per step in this mode (their norms cost ~2% of a CPU step): a non-finite gradient makes the weights it updates
  non-finite, which the next loss shows, and at the latest the weight check below, before anything is saved.
* `skip: N`: after every backward the loss and the gradient norms (anchor parameters, fetched bank blocks) are read on
  the host (one sync per step, paid only in this mode), and a bad batch is dropped before any optimizer sees it
  (`HMLMModule.skip_update`), up to N times in the run.

Before every checkpoint and before the export every weight is checked (anchor parameters and every bank tensor the
store checkpoints), so a non-finite value no loss showed yet (a block no recent batch fetched) is caught too. Under
data parallelism every decision is reduced over the ranks, so all ranks stop together.
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


def first_nonfinite_weight(model: Any) -> str | None:
    """The name of the first anchor parameter or bank tensor of `model` (a MemoryLM) holding a NaN/inf, or None."""
    named = [(f"anchor.{n}", p) for n, p in model.anchor.named_parameters()]
    if model.store is not None:
        named += [(f"bank.{k}", t) for k, t in _flat_tensors(model.store.state_dict())]
    named = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return None
    # a NaN/inf makes the fp32-accumulated sum non-finite; a sum needs no tensor-sized temporary (a multi-GB bank), and
    # all of them are read back in one host sync. Only a tensor whose sum is non-finite is searched element-wise
    sums = torch.stack([t.sum(dtype=torch.float32).to(named[0][1].device) for _, t in named])
    if bool(torch.isfinite(sums).all()):
        return None
    for (name, t), ok in zip(named, torch.isfinite(sums).tolist()):
        if not ok and not bool(torch.isfinite(t).all()):
            return name
    return None  # only an fp32 overflow of a sum of huge but finite values


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
        self._first_bad: torch.Tensor | None = None    # device scalar: the first step whose loss was non-finite
        self._loss_finite: torch.Tensor | None = None  # skip > 0: this step's loss, until the gradients are in

    # -------------------------------------------------------------- per step (no host sync unless skip > 0)
    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach())
        if self.skip > 0:
            self._loss_finite = finite  # decided after backward, with the gradients
            return
        if self._first_bad is None or self._first_bad.device != finite.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=finite.device)
        self._first_bad = torch.where((self._first_bad < 0) & ~finite,
                                      torch.full_like(self._first_bad, trainer.global_step), self._first_bad)

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.skip == 0 or self._loss_finite is None:
            return
        ok, self._loss_finite = self._loss_finite, None
        grads = _grads_finite(pl_module)
        if grads is not None:
            ok = ok & grads.to(ok.device)
        if trainer.strategy.reduce_boolean_decision(not bool(ok), all=False):  # the one host sync of this mode
            self._skip(trainer, pl_module, trainer.global_step)

    def _skip(self, trainer, pl_module, step: int) -> None:
        if len(self.skipped) >= self.skip:
            steps = ", ".join(map(str, self.skipped))
            raise NonFiniteError(self._message(f"a non-finite loss or gradient at step {step}, after skipping "
                                               f"{len(self.skipped)} bad batch(es) (at steps {steps})",
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
            reason = f"a non-finite loss at step {bad}"
        if reason is None and weights and (name := first_nonfinite_weight(pl_module.model)) is not None:
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

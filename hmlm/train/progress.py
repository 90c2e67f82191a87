"""A rich progress bar for step-budgeted runs (no epochs, no logger version in the metrics), and quiet Lightning."""
from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Shows `pl_module.progress_metrics` (plain floats the module refreshes on logging steps) besides Lightning's
    progress-bar metrics: a logged tensor there would be read back from the device, a host sync, on every step."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"train (max {self.trainer.max_steps} steps)"

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        items.update(getattr(pl_module, "progress_metrics", {}))
        return items


class _DropAdvert(logging.Filter):
    """Lightning prints an advertisement for a cloud logger on every fit; it is noise in a research log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


# Lightning warnings that say nothing about this run, matched by the start of their text only:
#  - Lightning's own pytree helper builds `LeafSpec()`, which torch >= 2.10 deprecates (Lightning's to fix);
#  - (below) our transfer_batch_to_device override, which Lightning reports when a DataModule is used;
#  - ModelCheckpoint's heuristic for manual optimization asks for a copy of the weights *before* the optimizer step
#    (a `saved_models` attribute). hmlm's training_step finishes every optimizer step before the checkpoint hook, so
#    the checkpoint it writes after the step is the state a resume needs (tests/test_fit.py checks exact resume).
_NOISE = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (UserWarning, r"Using ModelCheckpoint with manual optimization and every_n_train_steps"),
    # HMLMModule.transfer_batch_to_device keeps the tree paths on the host on purpose (the store reads them there)
    (UserWarning, r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a"),
)


def quiet_lightning_noise() -> None:
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvert) for f in logger.filters):
        logger.addFilter(_DropAdvert())
    for category, message in _NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)

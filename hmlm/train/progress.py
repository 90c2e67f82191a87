"""A rich progress bar for step-budgeted runs (no epochs, no logger version in the metrics)."""
from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        return f"train (max {self.trainer.max_steps} steps)"

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class _DropAdvert(logging.Filter):
    """Lightning prints an advertisement for a cloud logger on every fit; it is noise in a research log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning_adverts() -> None:
    """Drop Lightning's output that a user can do nothing about: the cloud-logger advert, torch's deprecation of the
    `LeafSpec` that Lightning itself still uses, and the checkpoint callback's 12-line advice for manual optimisation
    (hmlm's checkpoint after step N holds the state after N optimizer steps on purpose: that is what resume continues
    from, tests/test_repro.py)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvert) for f in logger.filters):
        logger.addFilter(_DropAdvert())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")

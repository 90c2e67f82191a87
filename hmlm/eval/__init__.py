"""Evaluation: held-out perplexity, the lm-eval adapter (`hmlm`), knowledge tasks and frequency-bucket reports.

Modules import lm-eval lazily so that `hmlm fit` never pays for it.
"""
from __future__ import annotations


class EvalError(RuntimeError):
    """A user error in an evaluation request (unknown task, memory mode, bucket edges, missing files)."""

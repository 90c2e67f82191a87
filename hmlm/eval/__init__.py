"""Evaluation: held-out perplexity, the lm-eval adapter (`hmlm`), knowledge tasks and frequency-bucket reports.

Modules import lm-eval lazily so that `hmlm fit` never pays for it.
"""
from __future__ import annotations

# requests per batch unless a run says otherwise (hmlm eval --batch-size, lm-eval's batch_size): large enough that a
# tiny model's decoding steps are not all overhead (the quickstart's eval: ~25% faster than 32), and capped for
# memories that are large per row (hmlm.eval.adapter.MEMORY_BYTES_PER_BATCH)
DEFAULT_BATCH_SIZE = 128


class EvalError(RuntimeError):
    """A user error in an evaluation request (unknown task, memory mode, bucket edges, missing files)."""

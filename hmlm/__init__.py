"""hmlm: pretraining language models with hierarchical parametric memories."""

__version__ = "0.1.0"


def load(path, **kwargs):
    """A trained model directory ready to generate and score: see hmlm.api.MemoryModel (imported on first use, so
    `import hmlm` stays light)."""
    from .api import load as _load

    return _load(path, **kwargs)

"""The exception types that mean "the user can fix this": the CLI prints them without a traceback (exit 2)."""
from __future__ import annotations


def _collect() -> tuple[type[BaseException], ...]:
    from .bank.levelfile import BankFileError
    from .bank.tiers import TierError
    from .config import RecipeError
    from .data.corpus import CorpusError
    from .eval import EvalError
    from .export import ModelDirError
    from .index import IndexError_
    from .inspect import InspectError
    from .registry import PluginError
    from .train.errors import FitError

    return (RecipeError, CorpusError, ModelDirError, IndexError_, PluginError, FitError, EvalError,
            TierError, BankFileError, InspectError, FileNotFoundError)


USER_ERRORS = _collect()

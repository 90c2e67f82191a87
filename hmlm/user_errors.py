"""The exception types that mean "the user can fix this": the CLI prints them without a traceback (exit 2)."""
from __future__ import annotations


def _collect() -> tuple[type[BaseException], ...]:
    from .bank.levelfile import BankFileError
    from .bank.tiers import TierError
    from .config import RecipeError
    from .convert import ConvertError
    from .data.corpus import CorpusError
    from .data.demo_corpus import DemoError
    from .embedders import EmbedderError
    from .eval import EvalError
    from .export import ModelDirError
    from .generate import GenerateError
    from .index import IndexError_
    from .inspect import InspectError
    from .knowledge import KnowledgeError
    from .registry import PluginError
    from .train.errors import FitError

    return (RecipeError, CorpusError, ModelDirError, IndexError_, PluginError, FitError, EvalError,
            TierError, BankFileError, InspectError, EmbedderError, DemoError, GenerateError, KnowledgeError, ConvertError,
            FileNotFoundError)


USER_ERRORS = _collect()

"""User errors of `hmlm fit`, in a leaf module so that the CLI can catch them without importing Lightning."""
from __future__ import annotations


class FitError(RuntimeError):
    """A run that cannot start or go on for a reason the user can fix (exit 2, one message naming file and key)."""


class NonFiniteError(FitError):
    """Training met a non-finite loss, gradient or weight; nothing non-finite was saved or exported."""


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """`Type: first sentence of the message`, for an error from a library (torch, safetensors) quoted in ours."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > limit and ". " in text[:limit]:
        text = text[:text.index(". ") + 1]
    elif len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

"""Embedders (plugins of the `hmlm.embedders` group) and what identifies their vector space.

An embedder's `identity()` mixes two kinds of key: those that define the vector space (name, model, dim,
max_length, the hashing features...) and those that only say how exactly it was computed (NUMERIC_KEYS: the
arithmetic precision, the dtype and origin of the weights). Routing a prompt with another space than the tree
was fitted in is meaningless; with other numerics of the same space it changes a small, measured fraction of
paths (`hmlm embedder check`, docs/benchmarks.md).
"""
from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, Mapping

NUMERIC_KEYS = frozenset({"precision", "weights_dtype", "weights_source"})


class EmbedderError(RuntimeError):
    """A bad embedder copy or setting the user can fix (printed without a traceback by the CLI)."""


def compare_identities(recorded: Mapping[str, Any], actual: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(vector-space differences, numeric differences) as `key: recorded -> actual` strings. Keys that only one
    side has are compared only when they define the space (an index written before a key existed lacks it)."""
    space, numeric = [], []
    for key in sorted(set(recorded) | set(actual)):
        a, b = recorded.get(key), actual.get(key)
        if a == b:
            continue
        if key in NUMERIC_KEYS:
            if a is not None and b is not None:
                numeric.append(f"{key}: {a} -> {b}")
        else:
            space.append(f"{key}: {a} -> {b}")
    return space, numeric


def fingerprint_fields(cfg: Any) -> dict[str, Any]:
    """The embedder settings that change an index's content: the recipe's fields without `path`, plus the content
    of the local copy `path` names (dtype, source weights). Without a path the dict is exactly the settings, so
    indexes built before `path` existed keep their fingerprint."""
    fields = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    path = fields.pop("path", None)
    if path:
        from .local_copy import fingerprint_fields as copy_fields

        fields["weights"] = copy_fields(path)
    return fields

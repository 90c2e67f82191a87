"""Frequency buckets from the model's own training corpus.

An item's count is, in order of preference (`source="auto"`):
  recorded   the repeat count of an injected fact: the bundled corpus writes facts_meta.json beside corpus.jsonl
             with the number of sentences stating each (relation, entity) pair; the model directory keeps a copy
  corpus     how often the entity (any of its names) occurs as whole words, case-insensitively, in the training
             split of the model's corpus, read from the model directory's word index (hmlm.eval.mentions);
             overlapping names count once, for the longest match ("Papua New Guinea" is not also "Guinea")

Which entity an item is about comes from its task's declaration (hmlm.eval.entities); entities that share a name
with another entity, or whose name is an everyday word, are flagged, never dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from . import EvalError
from .entities import EntityBook, EntityItem
from .mentions import count_mentions, training_texts  # noqa: F401  (the counting API, re-exported)
from .modeldata import EvalData

DEFAULT_EDGES = (0, 1, 10, 100, 1000)


def parse_edges(spec: str | Sequence[int]) -> tuple[int, ...]:
    """Lower edges of the buckets, e.g. "0,1,10,100,1000" -> buckets 0, 1-9, 10-99, 100-999, >=1000."""
    try:
        edges = tuple(int(v) for v in (spec.split(",") if isinstance(spec, str) else spec))
    except ValueError:
        raise EvalError(f"--buckets {spec!r}: expected comma-separated integers such as 0,1,10,100,1000") from None
    if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise EvalError(f"--buckets {spec!r}: edges must start at 0 and increase strictly")
    return edges


def bucket_labels(edges: Sequence[int] = DEFAULT_EDGES) -> list[str]:
    labels = []
    for i, lo in enumerate(edges):
        if i + 1 == len(edges):
            labels.append(f">={lo}")
        else:
            hi = edges[i + 1] - 1
            labels.append(str(lo) if hi == lo else f"{lo}-{hi}")
    return labels


def bucket_of(count: int, edges: Sequence[int] = DEFAULT_EDGES) -> str:
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    labels = bucket_labels(edges)
    i = max(j for j, lo in enumerate(edges) if count >= lo)
    return labels[i]


@dataclass
class FrequencyCounter:
    """Counts and flags for the task items of one model; the corpus word index is read once, on first need."""

    data: EvalData
    source: str = "auto"                       # auto | recorded | corpus
    book: EntityBook = field(default_factory=EntityBook)
    _recorded: dict[tuple[str, str], int] | None = field(default=None, init=False)
    _keys: dict[EntityItem, str] = field(default_factory=dict, init=False)
    _mentions: dict[str, int] | None = field(default=None, init=False)

    @classmethod
    def for_model(cls, data: EvalData, *, source: str = "auto", ambiguous: Iterable[str] = ()) -> "FrequencyCounter":
        if source not in ("auto", "recorded", "corpus"):
            raise EvalError(f"--bucket-source {source!r}: expected auto, recorded or corpus")
        counter = cls(data, source, EntityBook.bundled(ambiguous))
        if source != "corpus":
            counter._recorded = data.recorded_counts()
        if source == "recorded" and counter._recorded is None:
            raise EvalError(f"--bucket-source recorded: {data.label} was not trained on the bundled corpus, the only "
                            "one that records repeat counts; use --bucket-source corpus")
        return counter

    def prepare(self, items: Sequence[EntityItem]) -> None:
        """Resolve every item to its entity, then count all entities in one pass when some item needs it. Prepare
        every task's items together: flags and longest matches depend on all names in play."""
        new = [it for it in dict.fromkeys(items) if it not in self._keys]
        for it in new:
            self._keys[it] = self.book.resolve(it)
        if any(self._recorded_count(it) is None for it in new):
            index = self.data.mention_index()
            if index is not None:
                # every known entity's names, not just the items': longest matches must not depend on which
                # tasks are evaluated together
                self._mentions = index.count(self.book.spellings)

    def _recorded_count(self, item: EntityItem) -> int | None:
        if self._recorded is None or item.relation is None:
            return None
        return self._recorded.get((item.relation, self._keys[item]))

    def count(self, item: EntityItem) -> tuple[int, str] | None:
        """(count, source) for a prepared item; None when neither a recorded count nor the corpus is available."""
        recorded = self._recorded_count(item)
        if recorded is not None:
            return recorded, "recorded"
        if self._mentions is None or self._keys[item] not in self._mentions:
            return None
        return self._mentions[self._keys[item]], "corpus"

    def entity(self, item: EntityItem) -> str:
        """The key of the entity a prepared item is about."""
        return self._keys[item]

    def flags(self, item: EntityItem) -> list[str]:
        return self.book.flags(self._keys[item])

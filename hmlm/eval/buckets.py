"""Frequency buckets from the model's own training corpus.

An item's count is, in order of preference (`source="auto"`):
  recorded   the repeat count of an injected fact: the bundled corpus writes facts_meta.json beside corpus.jsonl
             with the number of sentences stating each (relation, entity) pair
  corpus     how often the entity (name or alias) occurs as whole words, case-insensitively, in the training
             split of the model's indexed corpus; overlapping names count once, for the longest match
             ("Papua New Guinea" is not also a mention of "Guinea")

Ambiguous entities are flagged, never dropped: names that are common English words ("lead", "iron", the
paper's caveat), whose corpus counts mix in other senses, and names shared by two entities (the city and the
country "Mexico"), whose counts and memories mix two facts.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from . import EvalError

DEFAULT_EDGES = (0, 1, 10, 100, 1000)

# Entity names that are also everyday English words or common names, so whole-word counts include other senses.
# Curated from the bundled tables (elements, countries, cities); extend with `hmlm eval --ambiguous WORD,...`.
AMBIGUOUS_WORDS = frozenset({
    "lead", "iron", "gold", "silver", "tin", "copper", "zinc", "nickel", "mercury", "carbon", "cobalt", "neon",
    "platinum", "chad", "china", "turkey", "georgia", "jordan", "guinea", "jersey", "nice", "reading", "bath",
    "mobile", "split", "victoria", "florence", "orange", "santiago", "salem", "hamilton", "lincoln",
})

_WORD = re.compile(r"[^\W_]+")


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


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def count_mentions(texts: Iterable[str], names: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Whole-word, case-insensitive mentions of each key's names in `texts`, leftmost-longest, non-overlapping.
    A name shared by several keys counts for each of them."""
    owners: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for key, spellings in names.items():
        for s in spellings:
            w = tuple(_words(s))
            if w:
                owners[w].add(key)
    by_first: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    for w in owners:
        by_first[w[0]].append(w)
    for cands in by_first.values():
        cands.sort(key=len, reverse=True)
    counts = {key: 0 for key in names}
    for text in texts:
        words = _words(text)
        i = 0
        while i < len(words):
            match = next((w for w in by_first.get(words[i], ()) if tuple(words[i:i + len(w)]) == w), None)
            if match is None:
                i += 1
                continue
            for key in owners[match]:
                counts[key] += 1
            i += len(match)
    return counts


def training_texts(index_dir: Path) -> Iterator[str]:
    """Texts of the training-split documents of an index (the corpus is re-read; documents.jsonl says the split)."""
    from ..data.corpus import iter_corpus

    index_dir = Path(index_dir)
    meta = json.loads((index_dir / "index.json").read_text(encoding="utf-8"))
    with open(index_dir / "documents.jsonl", encoding="utf-8") as f:
        splits = [json.loads(line)["split"] for line in f]
    corpus = Path(meta["corpus"])
    if not corpus.exists():
        raise EvalError(f"{index_dir / 'index.json'}: corpus {corpus} no longer exists; frequency buckets count "
                        "entities in the training corpus (use --bucket-source recorded for the bundled corpus)")
    for doc, split in zip(iter_corpus(corpus, max_docs=meta["data"].get("max_docs")), splits):
        if split == "train":
            yield doc.text


def recorded_counts(corpus: Path) -> dict[tuple[str, str], int] | None:
    """(relation, entity_key) -> repeat count from the bundled corpus's facts_meta.json; None for other corpora."""
    meta = Path(corpus).parent / "facts_meta.json"
    if not meta.is_file():
        return None
    facts = json.loads(meta.read_text(encoding="utf-8"))["facts"]
    return {(f["relation"], f["entity_key"]): int(f["repeat_count"]) for f in facts}


def _names_of(docs: Sequence[Mapping]) -> dict[str, list[str]]:
    return {d["entity_key"]: [d["entity"], *d.get("aliases", [])] for d in docs}


@dataclass
class FrequencyCounter:
    """Counts for the task items of one training corpus; corpus counting runs once, on first need."""

    index_dir: Path | None
    corpus: Path | None
    source: str = "auto"                       # auto | recorded | corpus
    ambiguous: frozenset[str] = AMBIGUOUS_WORDS
    _recorded: dict | None = field(default=None, init=False)
    _mentions: dict[str, int] | None = field(default=None, init=False)
    _shared: dict[str, set[str]] = field(default_factory=dict, init=False)
    _all_names: dict[str, list[str]] | None = field(default=None, init=False)

    @classmethod
    def for_model(cls, meta: Mapping, *, source: str = "auto",
                  ambiguous: Iterable[str] = ()) -> "FrequencyCounter":
        if source not in ("auto", "recorded", "corpus"):
            raise EvalError(f"--bucket-source {source!r}: expected auto, recorded or corpus")
        index = meta.get("index") or {}
        counter = cls(Path(index["dir"]) if index.get("dir") else None,
                      Path(index["corpus"]) if index.get("corpus") else None, source,
                      AMBIGUOUS_WORDS | {w.casefold() for w in ambiguous})
        if source != "corpus" and counter.corpus is not None and not meta.get("recipe", {}).get("data", {}).get(
                "max_docs"):
            counter._recorded = recorded_counts(counter.corpus)
        if source == "recorded" and counter._recorded is None:
            raise EvalError(f"--bucket-source recorded: {counter.corpus} has no facts_meta.json (only the bundled "
                            "corpus records repeat counts); use --bucket-source corpus")
        return counter

    def prepare(self, docs: Sequence[Mapping]) -> None:
        """Note names shared between the entities of `docs`, and count entities in one pass over the corpus
        when some item has no recorded count."""
        names: dict[str, set[str]] = defaultdict(set)
        for key, spellings in {**self._universe(), **_names_of(docs)}.items():
            for n in spellings:
                names[" ".join(_words(n))].add(key)
        self._shared = {n: keys for n, keys in names.items() if len(keys) > 1}
        need = [d for d in docs if self._recorded is None or (d["relation"], d["entity_key"]) not in self._recorded]
        if need and (self._mentions is None or any(d["entity_key"] not in self._mentions for d in need)):
            self._count_corpus(docs)

    def _count_corpus(self, docs: Sequence[Mapping]) -> None:
        if self.index_dir is None or not (self.index_dir / "documents.jsonl").is_file():
            raise EvalError(f"frequency buckets: the model's index {self.index_dir} is missing; buckets count "
                            "entities in the indexed training corpus")
        # a fixed universe of names (every bundled entity plus the items) keeps longest-match counts independent
        # of which tasks are evaluated together
        self._mentions = count_mentions(training_texts(self.index_dir), {**self._universe(), **_names_of(docs)})

    def _universe(self) -> dict[str, list[str]]:
        """Every bundled entity's spellings, by entity key (elements, countries, cities)."""
        if self._all_names is None:
            from ..data.bundled import load_fact_items

            self._all_names = {it.entity_key: [it.entity, *it.aliases] for it in load_fact_items()}
        return self._all_names

    def count(self, doc: Mapping) -> tuple[int, str]:
        """(count, source) for a task item with entity, aliases, entity_key and relation."""
        key = (doc["relation"], doc["entity_key"])
        if self._recorded is not None and key in self._recorded:
            return self._recorded[key], "recorded"
        if self._mentions is None or doc["entity_key"] not in self._mentions:
            self._count_corpus([doc])
        assert self._mentions is not None
        return self._mentions[doc["entity_key"]], "corpus"

    def flags(self, doc: Mapping) -> list[str]:
        out = []
        for n in [doc["entity"], *doc.get("aliases", [])]:
            norm = " ".join(_words(n))
            if norm in self.ambiguous:
                out.append(f"'{n}' is a common word")
            others = self._shared.get(norm, set()) - {doc["entity_key"]}
            if others:
                out.append(f"'{n}' also names {', '.join(sorted(others))}")
        return out

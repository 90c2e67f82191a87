"""Fact sentences with controlled repeat counts: the generator shared by the bundled corpus and the demo corpus.

A fact is an entity and one relation (Helium / atomic_number -> 2). A corpus states it `repeat_count` times with
the relation's training templates, in short documents about one entity; its evaluation templates (the first is
the paper-style prompt) never occur in training text, so evaluation probes the fact, not a memorised string.
How the counts are chosen is the caller's (hmlm.data.bundled: a Zipf-Mandelbrot law; hmlm.data.demo_corpus:
balanced over the frequency buckets). Everything here is deterministic for a seed and uses stdlib + numpy only.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

BUCKETS = ((0, 0, "0"), (1, 9, "1-9"), (10, 99, "10-99"), (100, 999, "100-999"), (1000, None, ">=1000"))
HELDOUT_FRACTION = 0.02          # of real-text documents, kept out of training for common-knowledge eval


@dataclass(frozen=True)
class Relation:
    """A fact type. Templates use {name} (the entity) and {answer}; eval templates end with {answer}
    so that the prompt is everything before it. eval_templates[0] is the paper-style prompt."""

    name: str
    subject: str                       # which table: element | country | city | person
    train_templates: tuple[str, ...]
    eval_templates: tuple[str, ...]


FACT_RELATIONS: dict[str, Relation] = {r.name: r for r in (
    Relation("atomic_number", "element",
             ("{name} has the atomic number {answer}.",
              "{name} is the chemical element with atomic number {answer}.",
              "Element number {answer} in the periodic table is {name}.",
              "Every nucleus of {name} contains {answer} protons.",
              "{name} sits at position {answer} of the periodic table."),
             ("The atomic number of {name} is {answer}",
              "Question: How many protons does an atom of {name} have?\nAnswer: {answer}")),
    Relation("symbol", "element",
             ("The chemical symbol {answer} stands for {name}.",
              "{name} is written with the symbol {answer}.",
              "{name} ({answer}) is a chemical element.",
              "Chemists abbreviate {name} as {answer}."),
             ("The chemical symbol of {name} is {answer}",
              "Question: Which symbol denotes {name} in the periodic table?\nAnswer: {answer}")),
    Relation("discovery_year", "element",
             ("{name} was discovered in {answer}.",
              "The discovery of {name} dates to {answer}.",
              "In {answer}, scientists discovered the element {name}.",
              "{name} was first identified as an element in {answer}."),
             ("The year in which {name} was discovered is {answer}",
              "Question: In what year was {name} discovered?\nAnswer: {answer}")),
    Relation("capital", "country",
             ("{answer} is the capital of {name}.",
              "The capital city of {name} is {answer}.",
              "{name} is governed from its capital, {answer}.",
              "The government of {name} sits in {answer}, the national capital."),
             ("The capital of {name} is {answer}",
              "Question: What is the capital city of {name}?\nAnswer: {answer}")),
    Relation("city_country", "city",
             ("{name} is a city in {answer}.",
              "The city of {name} lies in {answer}.",
              "{name} is located in {answer}.",
              "Many people in {answer} live in the city of {name}."),
             ("The country containing the city of {name} is {answer}",
              "Question: In which country is the city of {name}?\nAnswer: {answer}")),
)}

# people with a birth year (WordNet glosses, BSD calendar files): a relation of the demo corpus only, so the
# bundled corpus and its committed tasks stay as they are
BIRTH_YEAR = Relation("birth_year", "person",
                      ("{name} was born in {answer}.",
                       "The year {answer} saw the birth of {name}.",
                       "{name}, born in {answer}, is remembered to this day.",
                       "In {answer}, {name} was born."),
                      ("The year of birth of {name} is {answer}",
                       "Question: In what year was {name} born?\nAnswer: {answer}"))


def frequency_bucket(count: int) -> str:
    """The paper's log10 frequency buckets: 0, 1-9, 10-99, 100-999, >=1000."""
    for lo, hi, label in BUCKETS:
        if count >= lo and (hi is None or count <= hi):
            return label
    raise ValueError(f"repeat count must be >= 0, got {count}")


@dataclass(frozen=True)
class FactItem:
    """One evaluable fact and how often the training text states it."""

    relation: str
    entity: str
    aliases: tuple[str, ...]           # other spellings of the entity (Aluminium for Aluminum)
    answer: str
    repeat_count: int                  # sentences stating this fact in corpus.jsonl
    train_templates: tuple[str, ...]
    eval_templates: tuple[str, ...]
    answer_aliases: tuple[str, ...] = ()   # accepted answer variants (Bogotá for Bogota)
    entity_key: str = ""               # element/Helium, country/FR, city/2988507: the documents' id prefix
    background: int = 0                # sentences of the shipped real text naming entity and answer together
    popularity: int = 0                # population for countries and cities (a natural popularity axis), else 0

    @property
    def bucket(self) -> str:
        return frequency_bucket(self.repeat_count)

    def prompt(self, template: int = 0) -> str:
        """Evaluation prompt without the answer (the answer follows after a space)."""
        return self.eval_templates[template].split("{answer}")[0].rstrip().format(name=self.entity)

    def sentence(self, template: int) -> str:
        return self.train_templates[template].format(name=self.entity, answer=self.answer)


def relation_rng(seed: int, relation: str) -> np.random.Generator:
    # one stream per relation, so adding a relation never reshuffles the others
    return np.random.default_rng([seed, zlib.crc32(relation.encode())])


def fact_fields(relation: str, row: dict) -> dict | None:
    """Entity, answer and metadata of one table row for one relation; None when the row lacks it."""
    background = int(row.get("background", {}).get(relation, 0))
    if relation in ("atomic_number", "symbol", "discovery_year"):
        value = {"atomic_number": row["atomic_number"], "symbol": row["symbol"],
                 "discovery_year": row["discovery_year"]}[relation]
        if value is None:
            return None   # ancient elements (iron, gold, ...) have no discovery year
        return {"entity": row["name"], "aliases": tuple(row["aliases"]), "answer": str(value),
                "entity_key": f"element/{row['name']}", "background": background}
    if relation == "capital":
        return {"entity": row["name"], "aliases": tuple(row["aliases"]), "answer": row["capital"],
                "answer_aliases": tuple(row["capital_aliases"]), "entity_key": f"country/{row['iso']}",
                "background": background, "popularity": int(row["population"])}
    if relation == "city_country":
        return {"entity": row["name"], "aliases": (), "answer": row["country"],
                "entity_key": f"city/{row['geonameid']}", "background": background,
                "popularity": int(row["population"])}
    if relation == "birth_year":
        return {"entity": row["name"], "aliases": tuple(row.get("aliases", ())), "answer": str(row["birth_year"]),
                "entity_key": f"person/{row['key']}", "background": background}
    raise KeyError(f"no table mapping for relation {relation!r}")


def table_facts(relation: Relation, rows: Iterable[dict]) -> list[dict]:
    """The fact fields of every row that states `relation`, in table order."""
    return [f for f in (fact_fields(relation.name, row) for row in rows) if f is not None]


def make_items(relation: Relation, facts: Sequence[dict], counts: Sequence[int]) -> list[FactItem]:
    return [FactItem(relation=relation.name, repeat_count=int(c), train_templates=relation.train_templates,
                     eval_templates=relation.eval_templates, **f) for f, c in zip(facts, counts)]


def balanced_counts(n: int, rng: np.random.Generator, *, max_count: int = 1000) -> np.ndarray:
    """Repeat counts for n facts, balanced over the five buckets: a random fifth each gets 0, 1-9, 10-99,
    100-999 and exactly `max_count`; inside a bucket the counts are spread evenly in log scale (a Zipf-like
    density), so e.g. 1, 2, 3, 5, 9 rather than all 5."""
    counts = np.zeros(n, dtype=np.int64)
    for (lo, hi, _), group in zip(BUCKETS, np.array_split(rng.permutation(n), len(BUCKETS))):
        if len(group) == 0 or lo == 0:
            continue
        if hi is None:
            counts[group] = max_count
            continue
        values = np.rint(np.exp(np.linspace(np.log(lo), np.log(hi), len(group)))).astype(np.int64)
        counts[group] = rng.permutation(np.clip(values, lo, hi))
    return counts


def fact_documents(items: list[FactItem], seed: int) -> Iterator[dict]:
    """Documents of 1-3 fact sentences about one entity. An entity's mentions (over all its relations)
    are shuffled and chunked; templates are used in rotation so each one appears about equally often."""
    rng = np.random.default_rng([seed, zlib.crc32(b"fact-documents")])
    by_entity: dict[str, list[FactItem]] = {}
    for it in items:
        by_entity.setdefault(it.entity_key, []).append(it)
    for key, facts in by_entity.items():
        sentences = []
        for it in facts:
            offset = int(rng.integers(len(it.train_templates)))
            sentences += [it.sentence((offset + k) % len(it.train_templates)) for k in range(it.repeat_count)]
        order = rng.permutation(len(sentences))
        start, j = 0, 0
        while start < len(sentences):
            size = int(rng.integers(1, 4))
            text = " ".join(sentences[i] for i in order[start:start + size])
            yield {"id": f"fact/{key}/{j}", "text": text, "source": "facts"}
            start, j = start + size, j + 1


def is_heldout(doc_id: str) -> bool:
    """Deterministic by id alone (not the seed), so the held-out text is the same for every run."""
    h = int.from_bytes(hashlib.sha256(f"heldout:{doc_id}".encode()).digest()[:8], "big")
    return h < HELDOUT_FRACTION * 2**64


def facts_meta(items: Sequence[FactItem], relations: Iterable[Relation], *, seed: int, schedule: dict,
               docs: Sequence[dict], heldout_docs: int) -> dict:
    """The facts_meta.json written beside a corpus.jsonl: every fact with its repeat count (what hmlm eval's
    recorded frequency buckets read), the templates, bucket counts per relation and per-source sizes."""
    stats: dict[str, dict[str, int]] = {}
    for d in docs:
        s = stats.setdefault(d["source"], {"docs": 0, "chars": 0})
        s["docs"] += 1
        s["chars"] += len(d["text"])
    buckets: dict[str, dict[str, int]] = {}
    for it in items:
        b = buckets.setdefault(it.relation, {label: 0 for _, _, label in BUCKETS})
        b[it.bucket] += 1
    return {
        "seed": seed,
        "schedule": schedule,
        "relations": {r.name: {"subject": r.subject, "train_templates": list(r.train_templates),
                               "eval_templates": list(r.eval_templates)} for r in relations},
        "buckets": buckets,
        "stats": {"sources": stats, "heldout_docs": heldout_docs},
        "facts": [{k: v for k, v in asdict(it).items() if k not in ("train_templates", "eval_templates")}
                  | {"bucket": it.bucket} for it in items],
    }


def write_corpus_files(folder: Path, docs: Sequence[dict], heldout: Sequence[dict], meta: dict, seed: int) -> None:
    """corpus.jsonl (documents in a seeded shuffled order, so any prefix (max_docs) or split sees every source),
    heldout.jsonl and facts_meta.json, the layout hmlm eval's recorded frequency buckets read."""
    order = np.random.default_rng([seed, zlib.crc32(b"corpus-order")]).permutation(len(docs))
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in order:
            f.write(json.dumps(docs[i], ensure_ascii=False) + "\n")
    with open(folder / "heldout.jsonl", "w", encoding="utf-8") as f:
        for d in heldout:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    (folder / "facts_meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")

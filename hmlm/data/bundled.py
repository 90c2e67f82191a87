"""The default corpus: real text shipped with the package plus fact sentences with controlled frequencies.

Shipped (hmlm/data/bundled/, built by scripts/build_bundled_data.py; sources in docs/data.md):
  wiki.jsonl.xz     real Wikipedia articles split into ~1-2.5k-character documents
  glosses.jsonl.xz  WordNet noun glosses, a few related senses per document
  facts.json.xz     elements (mendeleev), countries with capitals and cities (GeoNames)

Generated here (stdlib + numpy, deterministic for a seed): every fact (an entity and one relation, e.g.
Helium / atomic_number -> 2) gets a repeat count from a Zipf-like schedule spanning 0..1000 and is
stated that many times with training paraphrase templates, in short documents about one entity. The
count is the fact's frequency bucket at evaluation time. Evaluation templates (the first of each relation
is the paper-style prompt) never occur in the training text, so evaluation probes the fact, not a string.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
SHIPPED_FILES = ("wiki.jsonl.xz", "glosses.jsonl.xz", "facts.json.xz")
HELDOUT_FRACTION = 0.02          # of wiki documents, kept out of corpus.jsonl for common-knowledge eval

# Zipf-Mandelbrot schedule, count(r) = floor(MAX_COUNT * ((1+q)/(r+q))**a) over ranks r = 1..n with
# q = HEAD * n; a is solved per relation so that the last ZERO_FRACTION of ranks get count 0. The head
# offset q flattens the top so the 100-999 bucket holds ~8% of facts instead of a handful (pure Zipf).
MAX_COUNT = 1000
ZERO_FRACTION = 0.15
HEAD = 0.05
BUCKETS = ((0, 0, "0"), (1, 9, "1-9"), (10, 99, "10-99"), (100, 999, "100-999"), (1000, None, ">=1000"))


@dataclass(frozen=True)
class Relation:
    """A fact type. Templates use {name} (the entity) and {answer}; eval templates end with {answer}
    so that the prompt is everything before it. eval_templates[0] is the paper-style prompt."""

    name: str
    subject: str                       # which table: element | country | city
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


# ---------------------------------------------------------------- shipped files

def _read_shipped(name: str) -> bytes:
    path = BUNDLED_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the bundled data did not install with hmlm. Reinstall "
                                f"the package, or rebuild it with `python scripts/build_bundled_data.py`.")
    return lzma.decompress(path.read_bytes())


def _read_jsonl(name: str) -> list[dict]:
    rows = []
    for i, line in enumerate(_read_shipped(name).decode("utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{BUNDLED_DIR / name}: line {i} is not valid JSON ({e}); rebuild it with "
                             f"`python scripts/build_bundled_data.py`") from e
        if "id" not in row or "text" not in row:
            raise ValueError(f"{BUNDLED_DIR / name}: line {i} lacks 'id' or 'text'")
        rows.append(row)
    return rows


def _fact_tables() -> dict:
    return json.loads(_read_shipped("facts.json.xz"))


# ---------------------------------------------------------------- repeat counts

def zipf_schedule(n: int, *, max_count: int = MAX_COUNT, zero_fraction: float = ZERO_FRACTION,
                  head: float = HEAD) -> np.ndarray:
    """Repeat counts for ranks 1..n, descending: max_count at rank 1, 0 for the last zero_fraction."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    q = head * n
    last_nonzero = max(1.0, n * (1 - zero_fraction))
    ratio = (last_nonzero + q) / (1 + q)
    a = np.log(max_count) / np.log(ratio) if ratio > 1 else 1.0
    r = np.arange(1, n + 1, dtype=np.float64)
    counts = np.floor(max_count * ((1 + q) / (r + q)) ** a + 1e-9).astype(np.int64)
    counts[r > last_nonzero] = 0   # guard against float rounding at the boundary
    return counts


def _relation_rng(seed: int, relation: str) -> np.random.Generator:
    # one stream per relation, so adding a relation never reshuffles the others
    return np.random.default_rng([seed, zlib.crc32(relation.encode())])


def _assign_counts(relation: str, backgrounds: list[int], seed: int) -> list[int]:
    """Shuffle the schedule over entities; an entity the real text already states never gets count 0,
    so the 0 bucket is a clean unseen control (it swaps with a random clean entity that has a count)."""
    rng = _relation_rng(seed, relation)
    n = len(backgrounds)
    counts = np.empty(n, dtype=np.int64)
    counts[rng.permutation(n)] = zipf_schedule(n)
    for i in np.flatnonzero((counts == 0) & (np.asarray(backgrounds) > 0)):
        clean = np.flatnonzero((counts > 0) & (np.asarray(backgrounds) == 0))
        if len(clean):
            j = clean[rng.integers(len(clean))]
            counts[i], counts[j] = counts[j], counts[i]
    return counts.tolist()


def load_fact_items(seed: int = 0) -> list[FactItem]:
    """Every fact with its repeat count for this seed (the same numbers build_bundled_corpus writes)."""
    tables = _fact_tables()
    rows_by_subject = {"element": tables["elements"]["rows"], "country": tables["countries"]["rows"],
                       "city": tables["cities"]["rows"]}
    items: list[FactItem] = []
    for rel in FACT_RELATIONS.values():
        facts = []
        for row in rows_by_subject[rel.subject]:
            fact = _fact_fields(rel.name, row)
            if fact is not None:
                facts.append(fact)
        counts = _assign_counts(rel.name, [f["background"] for f in facts], seed)
        for f, c in zip(facts, counts):
            items.append(FactItem(relation=rel.name, repeat_count=int(c), train_templates=rel.train_templates,
                                  eval_templates=rel.eval_templates, **f))
    return items


def _fact_fields(relation: str, row: dict) -> dict | None:
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
    raise KeyError(f"no table mapping for relation {relation!r}")


# ---------------------------------------------------------------- documents

def _fact_documents(items: list[FactItem], seed: int) -> Iterator[dict]:
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


def _cache_key(seed: int) -> str:
    h = hashlib.sha256(f"seed={seed}\n".encode())
    h.update(Path(__file__).read_bytes())   # templates or schedule changed -> a new corpus
    for name in SHIPPED_FILES:
        path = BUNDLED_DIR / name
        h.update(name.encode() + (path.read_bytes() if path.exists() else b"<missing>"))
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("HMLM_CACHE") or Path.home() / ".cache" / "hmlm").expanduser() / "bundled"


def build_bundled_corpus(cache_dir: Path | None = None, *, seed: int = 0) -> Path:
    """Write corpus.jsonl, heldout.jsonl and facts_meta.json for `seed` (once; cached) and return the
    corpus path. The cache folder is keyed by the seed, the shipped files and this module's code."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"seed{seed}-{_cache_key(seed)}"
    corpus = final / "corpus.jsonl"
    if corpus.exists():
        return corpus
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        _write_corpus(tmp, seed)
        try:
            os.replace(tmp, final)   # atomic: readers see the whole folder or none of it
        except OSError:
            if not corpus.exists():  # not a concurrent builder that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return corpus


def _write_corpus(folder: Path, seed: int) -> None:
    items = load_fact_items(seed)
    wiki = _read_jsonl("wiki.jsonl.xz")
    glosses = _read_jsonl("glosses.jsonl.xz")
    docs = [{"id": d["id"], "text": d["text"], "source": "wiki"} for d in wiki if not is_heldout(d["id"])]
    heldout = [{"id": d["id"], "text": d["text"], "source": "wiki", "split": "heldout"}
               for d in wiki if is_heldout(d["id"])]
    docs += [{"id": d["id"], "text": d["text"], "source": "wordnet"} for d in glosses]
    docs += list(_fact_documents(items, seed))
    # interleave sources so any prefix (max_docs) or split sees all of them
    order = np.random.default_rng([seed, zlib.crc32(b"corpus-order")]).permutation(len(docs))

    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in order:
            f.write(json.dumps(docs[i], ensure_ascii=False) + "\n")
    with open(folder / "heldout.jsonl", "w", encoding="utf-8") as f:
        for d in heldout:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")

    stats: dict[str, dict[str, int]] = {}
    for d in docs:
        s = stats.setdefault(d["source"], {"docs": 0, "chars": 0})
        s["docs"] += 1
        s["chars"] += len(d["text"])
    buckets: dict[str, dict[str, int]] = {}
    for it in items:
        b = buckets.setdefault(it.relation, {label: 0 for _, _, label in BUCKETS})
        b[it.bucket] += 1
    meta = {
        "seed": seed,
        "schedule": {"max_count": MAX_COUNT, "zero_fraction": ZERO_FRACTION, "head": HEAD},
        "relations": {r.name: {"subject": r.subject, "train_templates": list(r.train_templates),
                               "eval_templates": list(r.eval_templates)} for r in FACT_RELATIONS.values()},
        "buckets": buckets,
        "stats": {"sources": stats, "heldout_docs": len(heldout)},
        "facts": [{k: v for k, v in asdict(it).items() if k not in ("train_templates", "eval_templates")}
                  | {"bucket": it.bucket} for it in items],
    }
    (folder / "facts_meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")

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
The fact-sentence generator itself (relations, templates, documents) is shared with the demo corpus: hmlm.data.facts.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .facts import (BUCKETS, FACT_RELATIONS, FactItem, Relation, fact_documents, fact_fields, facts_meta,
                    frequency_bucket, is_heldout, make_items, relation_rng, write_corpus_files)

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
SHIPPED_FILES = ("wiki.jsonl.xz", "glosses.jsonl.xz", "facts.json.xz")

# Zipf-Mandelbrot schedule, count(r) = floor(MAX_COUNT * ((1+q)/(r+q))**a) over ranks r = 1..n with
# q = HEAD * n; a is solved per relation so that the last ZERO_FRACTION of ranks get count 0. The head
# offset q flattens the top so the 100-999 bucket holds ~8% of facts instead of a handful (pure Zipf).
MAX_COUNT = 1000
ZERO_FRACTION = 0.15
HEAD = 0.05

__all__ = ["BUCKETS", "FACT_RELATIONS", "FactItem", "Relation", "build_bundled_corpus", "frequency_bucket",
           "is_heldout", "load_fact_items", "zipf_schedule"]


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


def _assign_counts(relation: str, backgrounds: list[int], seed: int) -> list[int]:
    """Shuffle the schedule over entities; an entity the real text already states never gets count 0,
    so the 0 bucket is a clean unseen control (it swaps with a random clean entity that has a count)."""
    rng = relation_rng(seed, relation)
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
        facts = [f for f in (fact_fields(rel.name, row) for row in rows_by_subject[rel.subject]) if f is not None]
        items += make_items(rel, facts, _assign_counts(rel.name, [f["background"] for f in facts], seed))
    return items


# ---------------------------------------------------------------- documents

def _cache_key(seed: int) -> str:
    h = hashlib.sha256(f"seed={seed}\n".encode())
    for code in (Path(__file__), Path(__file__).with_name("facts.py")):
        h.update(code.read_bytes())   # templates or schedule changed -> a new corpus
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
    docs += list(fact_documents(items, seed))
    schedule = {"max_count": MAX_COUNT, "zero_fraction": ZERO_FRACTION, "head": HEAD}
    meta = facts_meta(items, FACT_RELATIONS.values(), seed=seed, schedule=schedule, docs=docs,
                      heldout_docs=len(heldout))
    write_corpus_files(folder, docs, heldout, meta, seed)

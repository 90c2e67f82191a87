"""The bundled default corpus: built from shipped files only, deterministic, with exact fact counts."""
from __future__ import annotations

import json
import lzma
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hmlm.data import bundled
from hmlm.data.bundled import (BUNDLED_DIR, FACT_RELATIONS, build_bundled_corpus, frequency_bucket,
                               load_fact_items, zipf_schedule)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = build_bundled_corpus(tmp_path_factory.mktemp("cache"), seed=0)
    docs = read_jsonl(path)
    meta = json.loads((path.parent / "facts_meta.json").read_text(encoding="utf-8"))
    return path, docs, meta


def test_shipped_files_small_and_listed_in_manifest():
    manifest = json.loads((BUNDLED_DIR / "MANIFEST.json").read_text())
    total = 0
    for name in bundled.SHIPPED_FILES:
        size = (BUNDLED_DIR / name).stat().st_size
        assert manifest["files"][name]["bytes"] == size, f"{name} changed since the manifest was written"
        total += size
    assert total < 6_000_000
    assert (BUNDLED_DIR / "LICENSES.md").read_text().count("WordNet 3.0 Copyright 2006 by Princeton University") == 1


def test_corpus_shape_and_size(built):
    path, docs, meta = built
    assert [set(d) for d in docs[:1]] == [{"id", "text", "source"}]
    ids = [d["id"] for d in docs]
    assert len(ids) == len(set(ids)), "document ids must be unique"
    assert len(docs) <= 30_000
    chars = sum(len(d["text"]) for d in docs)
    assert 4_000_000 <= chars <= 7_500_000
    sources = Counter(d["source"] for d in docs)
    assert set(sources) == {"wiki", "wordnet", "facts"}
    assert all(d["text"].strip() for d in docs)
    assert meta["stats"]["sources"]["facts"]["docs"] == sources["facts"]


def test_deterministic_for_a_seed_and_seed_matters(built, tmp_path):
    path, _, _ = built
    again = build_bundled_corpus(tmp_path / "a", seed=0)
    assert again.read_bytes() == path.read_bytes()
    assert (again.parent / "facts_meta.json").read_bytes() == (path.parent / "facts_meta.json").read_bytes()
    other = build_bundled_corpus(tmp_path / "b", seed=1)
    assert other.read_bytes() != path.read_bytes()


def test_cached_second_call_does_not_rewrite(tmp_path):
    first = build_bundled_corpus(tmp_path, seed=3)
    stamp = first.stat().st_mtime_ns, first.stat().st_ino
    second = build_bundled_corpus(tmp_path, seed=3)
    assert second == first
    assert (second.stat().st_mtime_ns, second.stat().st_ino) == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.parent.name], "no temp folders left behind"


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HMLM_CACHE", str(tmp_path))
    assert bundled.default_cache_dir() == tmp_path / "bundled"


def test_repeat_counts_match_corpus(built):
    """Count every training-template sentence of sampled facts: exactly repeat_count, all in the
    entity's own fact documents."""
    _, docs, meta = built
    items = load_fact_items(0)
    assert [it.repeat_count for it in items] == [f["repeat_count"] for f in meta["facts"]]
    rng = np.random.default_rng(0)
    by_relation: dict[str, list] = {}
    for it in items:
        by_relation.setdefault((it.relation, it.bucket), []).append(it)
    sample = [group[int(rng.integers(len(group)))] for _, group in sorted(by_relation.items())]
    fact_docs = [d for d in docs if d["source"] == "facts"]
    for it in sample:
        pattern = re.compile("|".join(r"(?<!\w)" + re.escape(it.sentence(k)) for k in range(len(it.train_templates))))
        hits = [(d["id"], len(pattern.findall(d["text"]))) for d in fact_docs]
        hits = [(i, n) for i, n in hits if n]
        assert sum(n for _, n in hits) == it.repeat_count, (it.relation, it.entity)
        assert all(i.startswith(f"fact/{it.entity_key}/") for i, _ in hits)


def test_buckets_cover_the_range_and_zero_is_clean(built):
    _, _, meta = built
    items = load_fact_items(0)
    per_bucket = Counter(it.bucket for it in items)
    for label in ("0", "1-9", "10-99", "100-999"):
        assert per_bucket[label] >= 50, per_bucket
    assert max(it.repeat_count for it in items) == bundled.MAX_COUNT
    # the unseen control: count-0 facts are not stated by the shipped real text either
    assert all(it.background == 0 for it in items if it.repeat_count == 0)
    assert sum(meta["buckets"]["capital"].values()) == sum(it.relation == "capital" for it in items)


def test_real_facts_are_right():
    by_key = {(it.relation, it.entity): it for it in load_fact_items(0)}
    assert by_key["atomic_number", "Helium"].answer == "2"
    assert by_key["symbol", "Gold"].answer == "Au"
    assert by_key["discovery_year", "Helium"].answer == "1895"
    assert ("discovery_year", "Iron") not in by_key   # known since antiquity: no year to ask
    assert by_key["capital", "France"].answer == "Paris"
    assert "Aluminium" in by_key["atomic_number", "Aluminum"].aliases
    assert by_key["atomic_number", "Oganesson"].prompt() == "The atomic number of Oganesson is"


def test_templates_wellformed_and_eval_disjoint_from_train():
    for rel in FACT_RELATIONS.values():
        assert len(rel.train_templates) >= 4 and len(rel.eval_templates) >= 2
        assert rel.eval_templates[0].startswith("The ") and rel.eval_templates[0].endswith(" is {answer}")
        for t in rel.train_templates + rel.eval_templates:
            assert "{name}" in t and "{answer}" in t
        assert all(t.endswith("{answer}") for t in rel.eval_templates)
        train = " ".join(t.format(name="Zorblax", answer="Quux") for t in rel.train_templates).lower()
        for t in rel.eval_templates:
            assert t.split("{answer}")[0].rstrip().format(name="Zorblax").lower() not in train


def test_eval_prompts_never_in_training_text(built):
    _, docs, _ = built
    text = "\n".join(d["text"] for d in docs).lower()
    # every eval prompt starts with a fixed stem; only look where a stem occurs (fast on 6 MB)
    prompts_by_stem: dict[str, set[str]] = {}
    for it in load_fact_items(0):
        for k, t in enumerate(it.eval_templates):
            stem = t.split("{name}")[0].lower()
            assert stem, "eval templates must start with fixed text"
            prompts_by_stem.setdefault(stem, set()).add(it.prompt(k).lower())
    for stem, prompts in prompts_by_stem.items():
        longest = max(map(len, prompts))
        for m in re.finditer(re.escape(stem), text):
            window = text[m.start():m.start() + longest]
            assert not any(window.startswith(p) for p in prompts), window


def test_heldout_disjoint_from_corpus(built):
    path, docs, meta = built
    heldout = read_jsonl(path.parent / "heldout.jsonl")
    assert 10 <= len(heldout) == meta["stats"]["heldout_docs"]
    assert all(d["split"] == "heldout" and d["source"] == "wiki" for d in heldout)
    corpus_ids = {d["id"] for d in docs}
    held_ids = {d["id"] for d in heldout}
    assert not corpus_ids & held_ids
    shipped = {json.loads(l)["id"] for l in lzma.open(BUNDLED_DIR / "wiki.jsonl.xz", "rt", encoding="utf-8")}
    assert shipped == held_ids | {i for i in corpus_ids if i.startswith("wiki/")}


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000))
def test_zipf_schedule_properties(n):
    c = zipf_schedule(n)
    assert len(c) == n and c[0] == bundled.MAX_COUNT
    assert np.all(np.diff(c) <= 0) and c.min() >= 0
    nonzero = max(1, int(np.floor(n * (1 - bundled.ZERO_FRACTION) + 1e-9)))
    assert np.count_nonzero(c) == nonzero


@given(k=st.integers(0, 10**6))
def test_frequency_bucket_is_log10(k):
    label = frequency_bucket(k)
    if k == 0:
        assert label == "0"
    elif k >= 1000:
        assert label == ">=1000"
    else:
        lo = 10 ** int(np.log10(k))
        assert label == f"{lo}-{lo * 10 - 1}"

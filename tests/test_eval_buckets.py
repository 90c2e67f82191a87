"""Frequency buckets, entity counting, answer scoring and the generated task files (no model needed)."""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hmlm.data.bundled import frequency_bucket
from hmlm.eval import EvalError
from hmlm.eval.buckets import (FrequencyCounter, bucket_labels, bucket_of, count_mentions, parse_edges,
                               training_texts)
from hmlm.eval.scoring import is_correct
from hmlm.eval.tasks import REPO_TASKS, lastword_rows, task_files


def test_default_buckets_match_the_bundled_corpus():
    assert bucket_labels() == ["0", "1-9", "10-99", "100-999", ">=1000"]
    assert all(bucket_of(c) == frequency_bucket(c) for c in range(0, 3000, 7))
    assert bucket_labels(parse_edges("0,5,50")) == ["0-4", "5-49", ">=50"]
    for bad in ("1,10", "0,10,10", "0,a"):
        with pytest.raises(EvalError, match="--buckets"):
            parse_edges(bad)


def test_count_mentions_whole_words_aliases_and_longest_match():
    texts = ["Lead is heavy; the leader led. LEAD pipes.",
             "Aluminium or aluminum? Papua New Guinea is not Guinea.",
             "Guinea-Bissau borders Guinea."]
    names = {"pb": ["Lead"], "al": ["Aluminum", "Aluminium"], "gn": ["Guinea"], "pg": ["Papua New Guinea"]}
    # "leader"/"led" are other words; the PNG mention is not also a Guinea mention; "Guinea-Bissau" is two words
    assert count_mentions(texts, names) == {"pb": 2, "al": 2, "gn": 3, "pg": 1}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["Helium", "New Zealand", "Zealand", "iron", "filler", "text", "x"]),
                max_size=40))
def test_count_mentions_equals_a_naive_count(words):
    names = {"he": ["Helium"], "nz": ["New Zealand"], "z": ["Zealand"], "fe": ["Iron"]}
    text = " ".join(words)
    # naive reference: scan left to right preferring the two-word name
    expected = {k: 0 for k in names}
    i = 0
    while i < len(words):
        if words[i:i + 2] == ["New", "Zealand"] or words[i] == "New Zealand":
            expected["nz"] += 1
        elif words[i] == "Zealand":
            expected["z"] += 1
        elif words[i] == "Helium":
            expected["he"] += 1
        elif words[i] == "iron":
            expected["fe"] += 1
        i += 1
    assert count_mentions([text], names) == expected


def test_corpus_counts_on_the_indexed_training_split(tiny_model_dir):
    meta = json.loads((tiny_model_dir / "model.json").read_text())
    counter = FrequencyCounter.for_model(meta)   # the small test corpus has no facts_meta.json: corpus counts
    index_dir = tiny_model_dir.parent / "index"
    docs_meta = [json.loads(line) for line in (index_dir / "documents.jsonl").read_text().splitlines()]
    corpus = [json.loads(line) for line in open(meta["index"]["corpus"], encoding="utf-8")]
    train = [d["text"] for d, m in zip(corpus, docs_meta) if m["split"] == "train"]
    assert list(training_texts(index_dir)) == train
    items = [{"relation": "atomic_number", "entity": e, "aliases": [], "entity_key": f"element/{e}"}
             for e in ("Helium", "Carbon", "Oxygen", "Lead")]
    counter.prepare(items)
    for it in items:
        expected = sum(len(re.findall(rf"\b{it['entity']}\b", t, flags=re.IGNORECASE)) for t in train)
        assert counter.count(it) == (expected, "corpus")
    assert counter.flags(items[3]) == ["'Lead' is a common word"] and counter.flags(items[0]) == []


def test_recorded_counts_and_shared_names(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("", encoding="utf-8")
    facts = [{"relation": "capital", "entity_key": "country/MX", "repeat_count": 42}]
    (tmp_path / "facts_meta.json").write_text(json.dumps({"facts": facts}), encoding="utf-8")
    counter = FrequencyCounter.for_model({"index": {"dir": None, "corpus": str(corpus)}})
    country = {"relation": "capital", "entity": "Mexico", "aliases": [], "entity_key": "country/MX"}
    city = {"relation": "city_country", "entity": "Mexico", "aliases": [], "entity_key": "city/1"}
    counter.prepare([country])
    assert counter.count(country) == (42, "recorded")
    with pytest.raises(EvalError, match="index"):
        counter.prepare([country, city])   # the city is not recorded and there is no index to count it in
    assert counter.flags(country) == ["'Mexico' also names city/1"]
    with pytest.raises(EvalError, match="bucket-source"):
        FrequencyCounter.for_model({}, source="sometimes")


@pytest.mark.parametrize("kind,generation,answers,ok", [
    ("integer", " 26 protons", ["26"], True), ("integer", " about 260", ["26"], False),
    ("integer", " unknown", ["26"], False), ("symbol", " Co.", ["Co"], True), ("symbol", " CO", ["Co"], False),
    ("name", " Paris, the capital", ["Paris"], True), ("name", " Parisian", ["Paris"], False),
    ("name", " bogotá", ["Bogota"], True), ("name", " St. John's.", ["St. John's"], True),
])
def test_answer_scoring(kind, generation, answers, ok):
    assert is_correct(kind, generation, answers) is ok


def test_committed_task_files_are_up_to_date(small_corpus):
    files = task_files()
    stale = [rel for rel, text in files.items()
             if not (REPO_TASKS / rel).is_file() or (REPO_TASKS / rel).read_text(encoding="utf-8") != text]
    assert not stale, f"run `python -m hmlm.eval.tasks` to regenerate {stale}"
    atomic = [json.loads(line) for line in files["data/atomic_number.jsonl"].splitlines()]
    assert len(atomic) == 118 and atomic[0]["prompt"] == "The atomic number of Hydrogen is"


def test_lastword_items_hide_the_word():
    rows = lastword_rows([{"id": "d", "text": "First sentence here. The cat sat on the mat. It was happy."}])
    assert [(r["context"], r["target"]) for r in rows] == [
        ("First sentence here. The cat sat on the", "mat"),
        ("First sentence here. The cat sat on the mat. It was", "happy")]

"""Frequency buckets, entity declarations and counting, ambiguity flags, answer scoring and the generated task files
(the tiny model only where its directory's word index is read)."""
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
from hmlm.eval.entities import EntityBook, EntityItem, EntitySpec
from hmlm.eval.mentions import MentionIndex
from hmlm.eval.modeldata import EvalData
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


def test_mention_index_round_trip_is_compact_and_exact(tmp_path):
    texts = ["Lead is heavy; the leader led.", "", "Papua New Guinea, Guinea and lead.", "guinea pig"]
    index = MentionIndex.from_texts(texts)
    assert index.ids.dtype == "uint16" and (index.n_words, index.n_documents) == (14, 4)
    index.save(tmp_path / "mentions")
    again = MentionIndex.load(tmp_path / "mentions")
    names = {"pb": ["Lead"], "gn": ["Guinea"], "pg": ["Papua New Guinea"], "none": ["Xenon"], "empty": ["--"]}
    assert again.count(names) == index.count(names) == {"pb": 2, "gn": 2, "pg": 1, "none": 0, "empty": 0}
    # a name never spans two documents: the separator is not a word
    assert MentionIndex.from_texts(["New", "Zealand"]).count({"nz": ["New Zealand"]}) == {"nz": 0}


def test_corpus_counts_come_from_the_model_directory(tiny_model_dir):
    from hmlm.export import load_model_dir

    loaded = load_model_dir(tiny_model_dir)
    data = EvalData.of(loaded)
    assert data.mentions == tiny_model_dir / "mentions" and data.heldout == tiny_model_dir
    index_dir = tiny_model_dir.parent / "index"
    docs_meta = [json.loads(line) for line in (index_dir / "documents.jsonl").read_text().splitlines()]
    corpus = [json.loads(line) for line in open(loaded.meta["index"]["corpus"], encoding="utf-8")]
    train = [d["text"] for d, m in zip(corpus, docs_meta) if m["split"] == "train"]
    assert list(training_texts(index_dir)) == train
    counter = FrequencyCounter.for_model(data)   # the small test corpus has no facts_meta.json: corpus counts
    items = [EntityItem(e, relation="atomic_number") for e in ("Helium", "Carbon", "Oxygen", "Lead")]
    counter.prepare(items)
    for it in items:
        expected = sum(len(re.findall(rf"\b{it.name}\b", t, flags=re.IGNORECASE)) for t in train)
        assert counter.count(it) == (expected, "corpus")
        assert counter.entity(it) == f"element/{it.name}"   # the bundled entity of that name
    assert counter.flags(items[3]) == ["'Lead' is a common word"] and counter.flags(items[0]) == []


def _facts_dir(tmp_path, facts):
    (tmp_path / "facts_meta.json").write_text(json.dumps({"facts": facts}), encoding="utf-8")
    return EvalData("test", recorded=tmp_path / "facts_meta.json", _why_no_mentions="no index in this test")


def test_flags_compare_entities_not_spellings(tmp_path):
    # an external task names its entities its own way: "France" is the bundled country/FR, not a second entity
    # that shares its name (the 83 false flags of issue 15); a name of two entities is still flagged
    counter = FrequencyCounter.for_model(_facts_dir(tmp_path, [
        {"relation": "capital", "entity_key": "country/FR", "repeat_count": 42}]))
    france = EntityItem("France", key="Q142", relation="capital")
    plain = EntityItem("France")
    book = EntityBook([("country/MX", ["Mexico"], "capital"), ("city/1", ["Mexico"], "city_country"),
                       ("country/FR", ["France"], "capital")])
    counter.book = book
    mexico = EntityItem("Mexico")
    mexico_capital = EntityItem("Mexico", relation="capital")
    new = EntityItem("Atlantis", aliases=("Atlantica",), key="Q1")
    counter.prepare([france, plain, mexico, mexico_capital, new])
    assert counter.entity(france) == counter.entity(plain) == "country/FR"
    assert counter.flags(france) == [] and counter.count(france) == (42, "recorded")
    assert counter.count(plain) is None   # no relation: no recorded count, and no word index here
    assert "no index in this test" in (counter.data.mentions_missing or "")
    assert counter.entity(mexico_capital) == "country/MX"   # the relation decides between the two
    assert counter.entity(mexico) == "entity:mexico"         # nothing decides: a new entity, flagged
    assert counter.flags(mexico) == ["'Mexico' also names city/1, country/MX"]
    assert counter.flags(mexico_capital) == ["'Mexico' also names city/1, entity:mexico"]
    assert counter.entity(new) == "Q1" and book.spellings["Q1"] == ("Atlantis", "Atlantica")
    with pytest.raises(EvalError, match="bucket-source recorded"):
        FrequencyCounter.for_model(EvalData("test"), source="recorded")
    with pytest.raises(EvalError, match="bucket-source"):
        FrequencyCounter.for_model(EvalData("test"), source="sometimes")


def test_task_metadata_declares_the_entity():
    doc = {"country": "France", "other": ["French Republic"], "qid": 142}
    spec = EntitySpec.from_metadata("t", {"hmlm_entity": "country", "hmlm_aliases": "other",
                                          "hmlm_entity_key": "qid", "hmlm_relation": "capital"})
    assert spec.item(doc) == EntityItem("France", ("French Republic",), "142", "capital")
    assert EntitySpec.from_metadata("t", {"version": 1}) is None
    by_function = EntitySpec.from_metadata("t", {"hmlm_entity": lambda d: [d["country"], "FR", d["country"]]})
    assert by_function.item(doc) == EntityItem("France", ("FR",))
    as_dict = EntitySpec.from_metadata("t", {"hmlm_entity": lambda d: {"name": "France", "key": "Q142"}})
    assert as_dict.item(doc) == EntityItem("France", (), "Q142")
    with pytest.raises(EvalError, match="doc field 'subject'.*country"):
        EntitySpec.from_metadata("t", {"hmlm_entity": "subject"}).item(doc)
    with pytest.raises(EvalError, match="hmlm_entity must be"):
        EntitySpec.from_metadata("t", {"hmlm_entity": 3})
    with pytest.raises(EvalError, match="no entity name"):
        EntitySpec.from_metadata("t", {"hmlm_entity": "country"}).item({"country": " "})


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

"""The demo corpus: build-demo reads every source archive offline and removes fact statements from the real text;
expand-demo states every fact exactly its recorded number of times, balanced over the buckets, never in an
evaluation template, and writes what hmlm eval's recorded buckets and the lm-eval task loader read."""
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

from demo_sources import build_sources
from hmlm.cli import main
from hmlm.data.demo import StatementScrubber, build_demo
from hmlm.data.demo_corpus import DEMO_RELATIONS, DemoError, expand_demo, fair_shares, select_text
from hmlm.data.facts import BUCKETS, balanced_counts, frequency_bucket
from hmlm.eval.modeldata import EvalData

pytest.importorskip("mwparserfromhell")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    build_demo(build_sources(root / "sources"), root / "demo", max_text_mb=None, log=lambda m: None)
    return root / "demo"


@pytest.fixture(scope="module")
def corpus_dir(demo_dir) -> Path:
    out = demo_dir.parent / "corpus"
    expand_demo(demo_dir, out, seed=3, facts_per_relation=10)
    return out


def _text(demo_dir: Path) -> list[dict]:
    return [json.loads(x) for x in lzma.decompress((demo_dir / "text.jsonl.xz").read_bytes()).decode().splitlines()]


def test_build_demo_reads_every_source(demo_dir):
    manifest = json.loads((demo_dir / "MANIFEST.json").read_text())
    assert set(manifest["sources"]) == {"wiki", "wordnet", "gcide", "fortunes", "sotu", "moby-dick", "brown"}
    assert manifest["archives"]["wordnet-base"]["version"] == "1:3.0-37"
    assert manifest["facts"] == {"elements": 12, "countries": 7, "cities": 12, "people": 4}
    tables = json.loads(lzma.decompress((demo_dir / "facts.json.xz").read_bytes()))
    people = {p["name"]: p["birth_year"] for p in tables["people"]["rows"]}
    # WordNet lifespans (not the BC one) and calendar births (not deaths or "birthday" lines)
    assert people == {"Edgar Douglas Adrian": 1889, "Marie Curie": 1867, "Isaac Asimov": 1920,
                      "Benjamin Franklin": 1706}
    docs = _text(demo_dir)
    assert len({d["id"] for d in docs}) == len(docs)
    brown = next(d["text"] for d in docs if d["source"] == "brown")
    assert "/at" not in brown and 'said "no evidence" was found.' in brown
    assert "WordNet 3.0 Copyright 2006" in (demo_dir / "LICENSES.md").read_text()


def test_build_demo_removes_fact_statements(demo_dir):
    text = "\n".join(d["text"] for d in _text(demo_dir))
    assert "atomic number 2" not in text and "Helium is a chemical element." in text
    assert "Ne\"on" not in text and "atomic number 10" not in text     # GCIDE entry headed by an entity
    assert "Edgar Douglas Adrian" not in text                           # WordNet synsets of table entities
    manifest = json.loads((demo_dir / "MANIFEST.json").read_text())
    assert manifest["sources"]["wiki"]["fact_sentences_removed"] == 12


def test_scrubber_matches_names_answers_and_topics():
    s = StatementScrubber([(["Abraham Lincoln"], ["1809"]), (["Algeria"], ["Algiers"]), (["Helium"], ["He"])])
    assert s.scrub("Abraham Lincoln was born in 1809. He was tall.") == ("He was tall.", 1)
    assert s.scrub("Lincoln was born in 1809.")[1] == 0                      # only the full name counts ...
    assert s.scrub("Lincoln was born in 1809.", topic="Abraham Lincoln")[1] == 1   # ... unless it is the topic
    assert s.scrub("Helium rises; he said so.")[1] == 0                      # answers are case-sensitive words
    assert s.scrub("Helium (He) rises.\n\nNext paragraph.") == ("Next paragraph.", 1)


def test_build_demo_missing_sources_is_actionable(tmp_path, capsys):
    with pytest.raises(DemoError, match="fetch_demo_sources.sh"):
        build_demo(tmp_path / "nope", tmp_path / "out", log=lambda m: None)
    (tmp_path / "empty").mkdir()
    assert main(["data", "build-demo", "--sources", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "missing mendeleev" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_expand_states_every_fact_exactly_its_count(corpus_dir):
    meta = json.loads((corpus_dir / "facts_meta.json").read_text())
    corpus = [json.loads(x) for x in (corpus_dir / "corpus.jsonl").read_text().splitlines()]
    facts_text = [d["text"] for d in corpus if d["source"] == "facts"]
    for f in meta["facts"]:
        rel = DEMO_RELATIONS[f["relation"]]
        sentences = [t.format(name=f["entity"], answer=f["answer"]) for t in rel.train_templates]
        pattern = re.compile("|".join(map(re.escape, sentences)))
        docs = [d for d in corpus if d["id"].startswith(f"fact/{f['entity_key']}/")]
        assert sum(len(pattern.findall(d["text"])) for d in docs) == f["repeat_count"], f
        assert f["bucket"] == frequency_bucket(f["repeat_count"])
        # no evaluation template, rendered for this entity, occurs in any training text
        for t in rel.eval_templates:
            prompt = t.split("{answer}")[0].rstrip().format(name=f["entity"])
            assert not any(prompt in x for x in facts_text)
    # what hmlm eval's `recorded` buckets read (a model directory carries this file as mentions/facts_meta.json)
    recorded = EvalData(label="demo", recorded=corpus_dir / "facts_meta.json").recorded_counts()
    assert recorded == {(f["relation"], f["entity_key"]): f["repeat_count"]
                        for f in meta["facts"]}


def test_expand_balances_buckets_per_relation(corpus_dir):
    meta = json.loads((corpus_dir / "facts_meta.json").read_text())
    assert set(meta["buckets"]) == set(DEMO_RELATIONS)
    for relation, counts in meta["buckets"].items():
        assert max(counts.values()) - min(counts.values()) <= 1, (relation, counts)
    assert max(f["repeat_count"] for f in meta["facts"]) == 1000


def test_expand_writes_heldout_and_eval_tasks(corpus_dir):
    summary = json.loads((corpus_dir / "demo.json").read_text())
    assert set(summary["tasks"]) >= {f"demo_{r}" for r in DEMO_RELATIONS} | {"demo_heldout_lastword"}
    rows = [json.loads(x) for x in (corpus_dir / "tasks" / "data" / "birth_year.jsonl").read_text().splitlines()]
    assert rows and all(r["kind"] == "integer" and r["prompt"].startswith("The year of birth of") for r in rows)
    assert "task: demo_birth_year" in (corpus_dir / "tasks" / "demo_birth_year.yaml").read_text()
    heldout = {json.loads(x)["id"] for x in (corpus_dir / "heldout.jsonl").read_text().splitlines()}
    train = {json.loads(x)["id"] for x in (corpus_dir / "corpus.jsonl").read_text().splitlines()}
    assert not heldout & train


def test_expand_is_deterministic_and_seeded(demo_dir, corpus_dir, tmp_path):
    again = expand_demo(demo_dir, tmp_path / "again", seed=3, facts_per_relation=10)
    assert again["fact_sentences"] > 0
    for name in ("corpus.jsonl", "heldout.jsonl", "facts_meta.json", "tasks/data/capital.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (corpus_dir / name).read_bytes()
    other = expand_demo(demo_dir, tmp_path / "other", seed=4, facts_per_relation=10)
    assert (tmp_path / "other" / "facts_meta.json").read_bytes() != (corpus_dir / "facts_meta.json").read_bytes()
    assert other["facts"] == again["facts"]


def test_expand_cli_and_bad_folder(demo_dir, tmp_path, capsys):
    assert main(["data", "expand-demo", "--demo", str(demo_dir), "--out", str(tmp_path / "c"),
                 "--facts-per-relation", "5", "--text-mb", "0.01"]) == 0
    assert "eval tasks" in capsys.readouterr().out
    chars = sum(len(json.loads(x)["text"]) for x in (tmp_path / "c" / "corpus.jsonl").read_text().splitlines()
                if json.loads(x)["source"] != "facts")
    assert chars <= 10_000
    assert main(["data", "expand-demo", "--demo", str(tmp_path), "--out", str(tmp_path / "d")]) == 2
    assert "not a demo folder" in capsys.readouterr().err


@settings(max_examples=60, deadline=None, derandomize=True)
@given(sizes=st.dictionaries(st.sampled_from("abcdefg"), st.integers(0, 1000), min_size=1),
       budget=st.integers(0, 5000))
def test_fair_shares_properties(sizes, budget):
    shares = fair_shares(sizes, budget)
    assert set(shares) == set(sizes)
    assert all(0 <= shares[s] <= sizes[s] for s in sizes)
    assert sum(shares.values()) <= budget or sum(shares.values()) == sum(sizes.values())
    capped = [s for s in sizes if shares[s] < sizes[s]]
    # every capped source gets at least as much as any other source (max-min fairness)
    assert all(shares[c] >= max(shares.values()) - 1 for c in capped)


def test_select_text_keeps_order_and_cap():
    docs = [{"id": str(i), "source": "ab"[i % 2], "text": "x" * (10 + i)} for i in range(40)]
    kept = select_text(docs, 300, seed=0)
    assert sum(len(d["text"]) for d in kept) <= 300
    assert [int(d["id"]) for d in kept] == sorted(int(d["id"]) for d in kept)
    assert select_text(docs, None, seed=0) == docs


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(0, 300), seed=st.integers(0, 5))
def test_balanced_counts_properties(n, seed):
    counts = balanced_counts(n, np.random.default_rng(seed))
    assert len(counts) == n
    per_bucket = Counter(frequency_bucket(int(c)) for c in counts)
    sizes = [per_bucket.get(label, 0) for _, _, label in BUCKETS]
    assert max(sizes) - min(sizes) <= 1
    assert np.array_equal(counts, balanced_counts(n, np.random.default_rng(seed)))


def test_lastword_items_from_sentences_longer_than_the_context():
    """Dictionary text has sentences longer than the last-word task's context window; they still make items."""
    from hmlm.eval.tasks import lastword_rows

    rows = lastword_rows([{"id": "d", "text": "A short opening. " + "and more words " * 80 + "then the ending."}])
    assert [r["target"] for r in rows] == ["ending"] and rows[0]["context"].startswith("and more")

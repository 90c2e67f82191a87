"""Knowledge inspection (hmlm.knowledge, `hmlm inspect --entity/--text`): the nodes whose training documents mention
a name, counted against the corpus itself; the model directory carries the training documents' paths; blocking the
node that holds an entity's documents routes its prompt elsewhere."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hmlm.eval.mentions import MentionIndex, words
from hmlm.knowledge import eval_data_of, entity_nodes, leaf_documents


def _training_docs(model_dir: Path) -> list[tuple[str, list[int]]]:
    """(text, path) of every training document, read from the index and its corpus (the slow, obvious way)."""
    index = model_dir.parent / "index"
    meta = json.loads((index / "index.json").read_text())
    docs = [json.loads(line) for line in (index / "documents.jsonl").read_text().splitlines()]
    texts = [json.loads(line)["text"] for line in Path(meta["corpus"]).read_text().splitlines() if line.strip()]
    return [(t, d["path"]) for t, d in zip(texts, docs) if d["split"] == "train"]


def _a_frequent_word(docs) -> str:
    counts = Counter(w for text, _ in docs for w in set(words(text)) if len(w) > 6 and w.isalpha())
    return sorted(counts, key=lambda w: (-counts[w], w))[0]


def test_the_model_dir_carries_the_training_paths(tiny_model_dir):
    docs = _training_docs(tiny_model_dir)
    paths = eval_data_of(tiny_model_dir).training_paths()
    assert paths.shape == (len(docs), 3)
    assert paths.tolist() == [p for _, p in docs]


def test_entity_nodes_match_a_count_over_the_corpus(tiny_model_dir):
    docs = _training_docs(tiny_model_dir)
    word = _a_frequent_word(docs)
    hits = entity_nodes(eval_data_of(tiny_model_dir), [word.capitalize()])
    for level in (1, 2, 3):
        want = Counter()
        mentions = Counter()
        for text, path in docs:
            n = words(text).count(word)
            if n:
                want[path[level - 1]] += 1
                mentions[path[level - 1]] += n
        got = {h.node: h for h in hits if h.level == level}
        assert {n: h.documents for n, h in got.items()} == dict(want)
        assert {n: h.mentions for n, h in got.items()} == dict(mentions)
    assert entity_nodes(eval_data_of(tiny_model_dir), ["Qzxqzxq"]) == []


def test_leaf_documents_are_on_the_leaf_and_share_words(tiny_model_dir):
    docs = _training_docs(tiny_model_dir)
    text, path = docs[5]
    got = leaf_documents(eval_data_of(tiny_model_dir), path, text, k=3)
    assert got[0]["doc"] == 5 and got[0]["words"] == words(text)
    on_leaf = {i for i, (_, p) in enumerate(docs) if p == path}
    assert {d["doc"] for d in got} <= on_leaf
    assert [d["shared"] for d in got] == sorted((d["shared"] for d in got), reverse=True)


def test_mention_documents_counts_per_document():
    idx = MentionIndex.from_texts(["Hafnium is hafnium.", "no", "New Hafnium Works and Hafnium"])
    assert idx.mention_documents(["Hafnium"]).tolist() == [2, 0, 2]
    assert idx.mention_documents(["New Hafnium Works", "Hafnium"]).tolist() == [2, 0, 2]
    assert idx.document_words(2) == ["new", "hafnium", "works", "and", "hafnium"]


def test_cli_inspect_entity_and_text(tiny_model_dir, capsys):
    from hmlm.cli import main

    word = _a_frequent_word(_training_docs(tiny_model_dir))
    assert main(["inspect", str(tiny_model_dir), "--entity", word]) == 0
    out = capsys.readouterr().out
    assert "mention" in out and "--memory blocked:" in out
    assert main(["inspect", str(tiny_model_dir), "--text", f"What is {word}?"]) == 0
    out = capsys.readouterr().out
    assert "level:node" in out and "leaf document" in out


def test_cli_inspect_entity_without_mentions_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    import shutil

    from hmlm.cli import main

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    shutil.rmtree(copy / "mentions")
    assert main(["inspect", str(copy), "--entity", "Hafnium"]) == 2
    err = capsys.readouterr().err
    assert "mentions" in err and "Traceback" not in err


def test_an_index_carried_without_its_corpus_exports_its_mentions(tiny_recipe, small_corpus, tmp_path, capsys):
    """`hmlm index` stores the mention index and training paths, so a model fitted from an index whose corpus is
    gone (carried to another machine) still has mentions/, and `hmlm inspect --entity` works on it."""
    import shutil

    from hmlm.cli import main
    from hmlm.index import ensure_index, read_index_meta
    from hmlm.train.fit import fit

    corpus = tmp_path / "corpus" / "small.jsonl"
    corpus.parent.mkdir()
    shutil.copyfile(small_corpus, corpus)
    recipe = tiny_recipe(**{"data.corpus": str(corpus), "trainer.max_steps": 2})
    index = ensure_index(recipe, progress=False)
    meta = read_index_meta(index)
    assert meta["mentions"]["documents"] == meta["counts"]["documents"] - meta["counts"]["val_documents"]
    assert {"mentions/words.safetensors", "mentions/vocab.txt", "mentions/paths.safetensors"} <= set(meta["checksums"])
    corpus.unlink()
    model = Path(fit(recipe, progress=False, final_eval=False)["model_dir"])
    entry = json.loads((model / "model.json").read_text())["eval_data"]
    assert entry["mentions"]["documents"] == meta["mentions"]["documents"] and "mentions_missing" not in entry
    docs = [(t, p) for t, p in zip(_corpus_texts(small_corpus), _index_docs(index)) if p is not None]
    paths = eval_data_of(model).training_paths()
    assert paths.tolist() == [p for _, p in docs]
    word = _a_frequent_word(docs)
    capsys.readouterr()
    assert main(["inspect", str(model), "--entity", word]) == 0
    assert "--memory blocked:" in capsys.readouterr().out


def _corpus_texts(corpus: Path) -> list[str]:
    return [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line.strip()]


def _index_docs(index: Path) -> list[list[int] | None]:
    """Each document's path, None for held-out ones."""
    docs = [json.loads(line) for line in (index / "documents.jsonl").read_text().splitlines()]
    return [d["path"] if d["split"] == "train" else None for d in docs]


def test_an_index_made_before_indexes_stored_mentions_exports_them_from_its_corpus(tiny_model_dir, tmp_path):
    import shutil

    from hmlm.eval.mentions import MentionIndex
    from hmlm.eval.modeldata import write_eval_data

    old = tmp_path / "index"
    shutil.copytree(tiny_model_dir.parent / "index", old)
    shutil.rmtree(old / "mentions")
    meta = json.loads((old / "index.json").read_text())
    meta.pop("mentions")
    (old / "index.json").write_text(json.dumps(meta))
    out = tmp_path / "model"
    out.mkdir()
    entry, sums = write_eval_data(old, out)
    assert entry["mentions"]["dir"] == "mentions" and "mentions/paths.safetensors" in sums
    stored = MentionIndex.load(tiny_model_dir.parent / "index" / "mentions")
    rebuilt = MentionIndex.load(out / "mentions")
    assert rebuilt.vocab == stored.vocab and rebuilt.ids.tolist() == stored.ids.tolist()
    assert ((out / "mentions" / "paths.safetensors").read_bytes()
            == (tiny_model_dir.parent / "index" / "mentions" / "paths.safetensors").read_bytes())

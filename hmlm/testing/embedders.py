"""Conformance checks for embedders (hmlm.protocols.Embedder)."""
from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import numpy as np

from ..protocols import Embedder

TEXTS = ["Hydrogen has atomic number 1.", "The Nile flows north.", "A sonnet has fourteen lines.",
         "Paris is the capital of France.", "Hydrogen has atomic number 1.", ""]


def check_embedder(make: Callable[[], Embedder]) -> None:
    emb = make()
    assert isinstance(emb, Embedder), "an embedder has dim, name, embed() and identity()"
    x = emb.embed(TEXTS)
    assert isinstance(x, np.ndarray) and x.dtype == np.float32, "embed must return a float32 numpy array"
    assert x.shape == (len(TEXTS), emb.dim), f"embed returned {x.shape}, expected [N, dim] = {(len(TEXTS), emb.dim)}"
    np.testing.assert_allclose(np.linalg.norm(x[:-1], axis=1), 1.0, rtol=1e-4, err_msg="rows must be unit vectors")
    np.testing.assert_allclose(x[0], x[4], rtol=0, atol=1e-6, err_msg="the same text embedded twice differs")
    np.testing.assert_allclose(make().embed(TEXTS), x, rtol=0, atol=1e-5, err_msg="embed is not deterministic")
    parts = np.concatenate([emb.embed(TEXTS[:2]), emb.embed(TEXTS[2:])])
    np.testing.assert_allclose(parts, x, rtol=0, atol=1e-5, err_msg="embeddings depend on how texts are batched")
    assert emb.embed([]).shape == (0, emb.dim), "an empty list must give [0, dim]"
    json.dumps(emb.identity())  # stored in index.json


class EmbedderTests:
    """pytest mix-in: subclass as `class TestMine(EmbedderTests)` and set `plugin` (and `options`, `config`)."""

    plugin: Any = None
    options: Mapping[str, Any] | None = None  # as under `index.embedder.options` in a recipe
    config: Mapping[str, Any] = {}            # other index.embedder.* keys

    def make(self) -> Embedder:
        from ..config import EmbedderConfig
        from .common import make_plugin

        assert self.plugin is not None, "set `plugin` to the embedder's registry name or class"
        return make_plugin("embedders", self.plugin, "from_config", EmbedderConfig(**dict(self.config)), seed=0,
                           options=self.options)

    def test_embedder_conformance(self):
        check_embedder(self.make)

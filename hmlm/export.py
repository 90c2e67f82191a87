"""The self-contained model directory: everything eval and generate need, nothing loaded with pickle.

    model.json            recipe, vocabulary size, anchor shape, bank layout, embedder identity, versions, sha256s
    anchor.safetensors    anchor weights (tied weights stored once)
    bank/<key>.safetensors one block-addressable file per level (`l0`, `l1`, ...) and `generic`
    tree.safetensors      the router's tree (copied from the index)
    tokenizer/            the tokenizer (copied from the index)
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from .config import Recipe, recipe_from_dict, to_dict
from .data.tokenizer import Tokenizer
from .model import MemoryLM, build_anchor, build_layout, build_store
from .utils import atomic_dir, read_json_artifact, sha256_file, verify_checksums, versions, write_json

MODEL_FORMAT = 1


class ModelDirError(RuntimeError):
    pass


def save_model_dir(model: MemoryLM, recipe: Recipe, index_dir: Path, out: Path, *, extra: dict | None = None) -> Path:
    index_dir, out = Path(index_dir), Path(out)
    index_meta = json.loads((index_dir / "index.json").read_text(encoding="utf-8"))
    with atomic_dir(out) as tmp:
        save_model(model.anchor, str(tmp / "anchor.safetensors"), metadata={"format": str(MODEL_FORMAT)})
        sums = {"anchor.safetensors": sha256_file(tmp / "anchor.safetensors")}
        if model.store is not None:
            sums.update({f"bank/{k}": v for k, v in model.store.save(tmp / "bank").items()})
        shutil.copy2(index_dir / "tree.safetensors", tmp / "tree.safetensors")
        shutil.copytree(index_dir / "tokenizer", tmp / "tokenizer")
        sums["tree.safetensors"] = sha256_file(tmp / "tree.safetensors")
        for p in sorted((tmp / "tokenizer").iterdir()):
            sums[f"tokenizer/{p.name}"] = sha256_file(p)
        layout = model.layout
        meta: dict[str, Any] = {
            "format": MODEL_FORMAT,
            "recipe": to_dict(recipe),
            "vocab_size": model.anchor.config.vocab_size,
            "anchor_shape": vars(model.anchor.shape) if not hasattr(model.anchor.shape, "__dataclass_fields__")
            else {f: getattr(model.anchor.shape, f) for f in model.anchor.shape.__dataclass_fields__},
            "memory": None if layout is None else {"type": recipe.memory.type, "sizes": list(layout.sizes),
                                                   "branching": layout.branching, "layers": list(layout.layers),
                                                   "generic": model.store.has_generic,
                                                   "store": recipe.memory.store},
            "embedder": index_meta["embedder"],
            "router": index_meta["router"],
            "index": {"dir": str(index_dir), "fingerprint": index_meta["fingerprint"],
                      "counts": index_meta["counts"], "corpus": index_meta["corpus"]},
            "versions": versions(),
            "checksums": sums,
        }
        if extra:
            meta.update(extra)
        write_json(tmp / "model.json", meta)
    return out


def verify_model_files(path: Path, meta: dict[str, Any], *, only: Sequence[str] | None = None,
                       progress: bool = False) -> None:
    """Check the model files against model.json's `checksums` (all of them, or the ones named in `only`).

    A model.json without `checksums`, or one that leaves a weight file out of them, is refused: deleting the key
    must not silently turn verification off. Loading such a model anyway takes an explicit verify=False
    (`hmlm eval --no-verify`, `hmlm fit --no-verify` for anchor.init_from).
    """
    meta_path = path / "model.json"
    sums = meta.get("checksums")
    skip_hint = "or load it without verification: verify=False in the API, --no-verify on the command line"
    if not isinstance(sums, dict) or not sums:
        raise ModelDirError(f"{meta_path}: key `checksums` is missing, so the model files cannot be verified; "
                            f"re-export the model (hmlm fit writes it), {skip_hint}")
    weights = ([path / "anchor.safetensors", path / "tree.safetensors"] + sorted((path / "bank").glob("*"))
               + sorted((path / "tokenizer").glob("*")))
    uncovered = [f for f in weights if f.is_file() and f.relative_to(path).as_posix() not in sums]
    if uncovered:
        raise ModelDirError(f"{uncovered[0]}: not covered by key `checksums` of {meta_path}, so it cannot be "
                            f"verified; re-export the model, {skip_hint}")
    if only is not None:
        sums = {rel: sums[rel] for rel in only if rel in sums}
    verify_checksums(path, sums, ModelDirError, listed_in=meta_path, fix="re-export the model", progress=progress)


@dataclass
class LoadedModel:
    """A model directory loaded for inference: route text, fetch memory, score tokens."""

    path: Path
    meta: dict[str, Any]
    recipe: Recipe
    model: MemoryLM
    tokenizer: Tokenizer
    router: Any
    _embedder: Any = None

    @property
    def embedder(self):
        if self._embedder is None:
            from .embedders import compare_identities
            from .index import build_embedder

            embedder = build_embedder(self.recipe)
            recorded = self.meta.get("embedder") or {}
            space, numeric = compare_identities(recorded, embedder.identity()) if recorded else ([], [])
            if space:
                raise ModelDirError(f"{self.path / 'model.json'}: the embedder at hand routes in another vector "
                                    f"space than the one this model's tree was fitted in ({'; '.join(space)}); "
                                    "evaluate with the embedder the index was built with")
            if numeric:
                import warnings

                warnings.warn(f"{self.path}: routing with the same embedder at other numerics than the index "
                              f"({'; '.join(numeric)}); paths agree on most but not all texts (hmlm embedder check)",
                              stacklevel=2)
            self._embedder = embedder
        return self._embedder

    @property
    def device(self) -> torch.device:
        return next(self.model.anchor.parameters()).device

    def to(self, device: str | torch.device) -> "LoadedModel":
        self.model.to(device)
        if self.model.store is not None:
            self.model.store.to_compute(device)
        return self

    def route(self, texts: Sequence[str], *, blocked: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
        """Tree paths [N, levels] for texts, by the same greedy descent used to index the training corpus."""
        emb = self.embedder.embed(list(texts)).astype(np.float32)
        return torch.from_numpy(self.router.route(emb, blocked=blocked).astype(np.int64))


def load_model_dir(path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True,
                   embedder_path: str | Path | None = None) -> LoadedModel:
    """Load a model directory. `embedder_path` routes with another copy of the index's embedder than the recipe
    names (a folder from `hmlm embedder export`, or "package" for the pip package), e.g. where the recorded
    copy's path does not exist."""
    path = Path(path)
    meta_path = path / "model.json"
    meta = read_json_artifact(meta_path, ModelDirError,
                              missing="not a model directory (no model.json); `hmlm fit` writes one to <out_dir>/model")
    if meta.get("format") != MODEL_FORMAT:
        raise ModelDirError(f"{meta_path}: model format {meta.get('format')!r}, this hmlm reads {MODEL_FORMAT}")
    if verify:
        verify_model_files(path, meta)
    recipe = recipe_from_dict(meta["recipe"], source=str(meta_path))
    if embedder_path is not None:
        recipe.index.embedder.path = None if str(embedder_path) == "package" else str(embedder_path)
    anchor = build_anchor(recipe, meta["vocab_size"])
    try:
        load_model(anchor, str(path / "anchor.safetensors"))
    except Exception as exc:  # safetensors raises plain errors on truncated/mismatched files
        raise ModelDirError(f"{path / 'anchor.safetensors'}: cannot load anchor weights ({exc})") from None
    layout = build_layout(recipe, anchor)
    store = build_store(recipe, layout, init=False)
    if store is not None:
        store.load(path / "bank")
    model = MemoryLM(anchor, layout, store).eval()
    from .index import load_router

    router = load_router(meta["router"]["name"], path / "tree.safetensors")
    loaded = LoadedModel(path, meta, recipe, model, Tokenizer.load(path / "tokenizer"), router)
    return loaded.to(device)

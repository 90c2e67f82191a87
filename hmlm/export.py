"""The self-contained model directory: everything eval and generate need, nothing loaded with pickle.

    model.json            recipe, vocabulary size, anchor shape, bank layout, embedder identity, versions, sha256s
    anchor.safetensors    anchor weights (tied weights stored once)
    bank/<key>.safetensors one file per level (`l0`, `l1`, ...) and `generic`: `blocks` [nodes, P] (one row per block,
                          data 4 KiB-aligned so the disk tier reads rows in place), `checksum` [nodes] (per block,
                          computed while writing and verified while reading, instead of re-hashing a 9 GB file),
                          `steps` [nodes] (training updates per block)
    tree.safetensors      the router's tree (copied from the index)
    tokenizer/            the tokenizer (copied from the index)
    shards/, node_stats.safetensors, mentions/
                          what evaluation needs from the index: held-out sequences, node statistics, the training
                          split's word index for entity counts (hmlm.eval.modeldata; model.json's `eval_data`)

Every path model.json records is relative to the model directory, so a copied or moved model works the same;
`index` is provenance only.
"""
from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from .config import Recipe, recipe_from_dict, to_dict
from .plugin_config import check_recorded_plugins, recipe_plugins
from .data.tokenizer import Tokenizer
from .model import MemoryLM, build_anchor, build_layout, build_store
from .utils import atomic_dir, read_json_artifact, sha256_file, verify_checksums, versions, write_json

MODEL_FORMAT = 2
READABLE_FORMATS = (1, 2)  # 1: bank files with one tensor per name (w1, w2, ...) and sha256s
EMBED_CACHE_SIZE = 200_000   # texts whose embedding a loaded model keeps (MiniLM: 1.5 KB each)


class ModelDirError(RuntimeError):
    pass


def save_model_dir(model: MemoryLM, recipe: Recipe, index_dir: Path, out: Path, *, extra: dict | None = None) -> Path:
    index_dir, out = Path(index_dir), Path(out)
    index_meta = json.loads((index_dir / "index.json").read_text(encoding="utf-8"))
    with atomic_dir(out) as tmp:
        save_model(model.anchor, str(tmp / "anchor.safetensors"), metadata={"format": str(MODEL_FORMAT)})
        sums = {"anchor.safetensors": sha256_file(tmp / "anchor.safetensors")}
        bank_files = model.store.save(tmp / "bank") if model.store is not None else {}
        shutil.copy2(index_dir / "tree.safetensors", tmp / "tree.safetensors")
        shutil.copytree(index_dir / "tokenizer", tmp / "tokenizer")
        sums["tree.safetensors"] = sha256_file(tmp / "tree.safetensors")
        for p in sorted((tmp / "tokenizer").iterdir()):
            sums[f"tokenizer/{p.name}"] = sha256_file(p)
        from .eval.modeldata import write_eval_data

        eval_data, eval_sums = write_eval_data(index_dir, tmp)
        sums.update(eval_sums)
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
                                                   "store": recipe.memory.store,
                                                   "tiers": {k: model.store.tier_of(k) for k in model.store.keys()}},
            "embedder": index_meta["embedder"],
            "router": index_meta["router"],
            "index": {"dir": str(index_dir), "fingerprint": index_meta["fingerprint"],
                      "counts": index_meta["counts"], "corpus": index_meta["corpus"]},
            "eval_data": eval_data,
            "versions": versions(),
            # which installed distribution provided each plugin: a model trained with a plugin that is not installed
            # where it is loaded then names the package to install instead of a bare "unknown plugin"
            "plugins": recipe_plugins(recipe),
            "checksums": sums,
            # bank files are verified block by block while they are read (a file-level sha256 of a multi-GB level
            # would cost minutes per load); this ties each file's checksum table to this export
            "bank_files": bank_files,
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
    bank_files = meta.get("bank_files") or {}
    uncovered = [f for f in weights if f.is_file() and f.relative_to(path).as_posix() not in sums
                 and not (f.parent.name == "bank" and f.name in bank_files)]
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
    _embedded: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    # `hmlm eval` embeds retrieval keys on a second thread while the tasks run (hmlm.eval.lane): one embedder call at
    # a time, so a key asked for on both threads is embedded once, by whichever comes first; a call whose keys are all
    # embedded already never waits for the other thread's embedder call (only for the table, _table_lock)
    _embed_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _table_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings [N, dim] of texts; each distinct text is embedded once per loaded model (evaluation routes
        the same keys under several memory modes, tasks and training-time evaluations)."""
        def missing() -> list[str]:
            with self._table_lock:
                return [t for t in dict.fromkeys(texts) if t not in self._embedded]

        while True:
            if missing():
                with self._embed_lock:
                    new = missing()   # the other thread may have embedded them while this one waited
                    if new:
                        vectors = self.embedder.embed(new).astype(np.float32)
                        with self._table_lock:
                            if len(self._embedded) + len(new) > EMBED_CACHE_SIZE:
                                self._embedded.clear()
                            self._embedded.update(zip(new, vectors))
            with self._table_lock:
                if not texts:
                    return np.zeros((0, self.embedder.dim), dtype=np.float32)
                if all(t in self._embedded for t in texts):   # else cleared by the other thread: embed again
                    return np.stack([self._embedded[t] for t in texts])

    def load_embedder(self) -> None:
        """Build the router's embedder and load its weights now (an embedder that loads lazily offers `load()`), so
        the first `embed` does not pay for it; `hmlm eval` calls this on its second thread."""
        with self._embed_lock:
            load = getattr(self.embedder, "load", None)
            if callable(load):
                load()

    def route(self, texts: Sequence[str], *, blocked: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
        """Tree paths [N, levels] for texts, by the same greedy descent used to index the training corpus."""
        emb = self.embed(list(texts))
        return torch.from_numpy(self.router.route(emb, blocked=blocked).astype(np.int64))


def load_model_dir(path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True,
                   model: MemoryLM | None = None, embedder_path: str | Path | None = None) -> LoadedModel:
    """Load a model directory for inference. Bank levels are placed on tiers planned for inference (memory.tiers of
    the recipe; `auto` plans without optimizer state); disk-tier levels are read in place from `bank/`.

    `model` reuses a model already in memory (the one `hmlm fit` just exported): only the router, tokenizer and
    metadata are read, nothing is re-loaded or re-hashed. `embedder_path` routes with another copy of the index's
    embedder than the recipe names (a folder from `hmlm embedder export`, or "package" for the pip package), e.g.
    where the recorded copy's path does not exist.
    """
    path = Path(path)
    meta_path = path / "model.json"
    meta = read_json_artifact(meta_path, ModelDirError,
                              missing="not a model directory (no model.json); `hmlm fit` writes one to <out_dir>/model")
    if meta.get("format") not in READABLE_FORMATS:
        raise ModelDirError(f"{meta_path}: model format {meta.get('format')!r}, this hmlm reads "
                            f"{', '.join(map(str, READABLE_FORMATS))}")
    if verify and model is None:
        verify_model_files(path, meta)
    check_recorded_plugins(meta.get("plugins"), str(meta_path))
    recipe = recipe_from_dict(meta["recipe"], source=str(meta_path))
    if embedder_path is not None:
        recipe.index.embedder.path = None if str(embedder_path) == "package" else str(embedder_path)
    if model is None:
        model = _load_weights(path, meta, recipe, device, verify=verify)
    from .index import load_router

    router = load_router(meta["router"]["name"], path / "tree.safetensors")
    loaded = LoadedModel(path, meta, recipe, model, Tokenizer.load(path / "tokenizer"), router)
    return loaded.to(device)


def _load_weights(path: Path, meta: dict, recipe: Recipe, device: str | torch.device, *,
                  verify: bool = True) -> MemoryLM:
    from .bank.levelfile import BankFileError

    anchor = build_anchor(recipe, meta["vocab_size"])
    try:
        load_model(anchor, str(path / "anchor.safetensors"))
    except Exception as exc:  # safetensors raises plain errors on truncated/mismatched files
        raise ModelDirError(f"{path / 'anchor.safetensors'}: cannot load anchor weights ({exc})") from None
    layout = build_layout(recipe, anchor)
    store = build_store(recipe, layout, init=False, anchor=anchor, training=False)
    if store is not None:
        if hasattr(store, "to_compute"):
            store.to_compute(device)   # levels are created where they will live, then filled
        try:
            # verify=False trusts the files as they are (every block of a format-2 file is still checked against
            # the file's own checksum table while it is read)
            digests = meta.get("bank_files") if verify else None
            store.load(path / "bank", **({"digests": digests} if digests else {}))
        except (BankFileError, ValueError) as exc:
            raise ModelDirError(str(exc)) from None
    return MemoryLM(anchor, layout, store).eval()

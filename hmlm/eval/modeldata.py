"""The evaluation data a model directory carries, so that a copied or moved model evaluates the same anywhere.

`hmlm fit` (through `save_model_dir`) copies from the index into the model directory, paths relative to it:

    shards/val-*.safetensors    the held-out sequences with their stored tree paths (held-out perplexity)
    node_stats.safetensors      documents and tokens routed to each node (perplexity per leaf frequency)
    mentions/                   the training split's words (hmlm.eval.mentions) for entity counts,
    mentions/paths.safetensors  the tree path of each of those training documents (`hmlm inspect --entity`, the
                                leaf's documents of `hmlm generate --show-path`), and
    mentions/facts_meta.json    the bundled corpus's recorded repeat count of each fact, when trained on it

and records them in model.json under `eval_data`. The mentions/ folder is the index's own copy (`hmlm index` stores
it, so an index carried without its corpus still exports it); an index made before that has its folder built from
the corpus at export, while the corpus is still where `hmlm index` read it. A model directory written before this
(no `eval_data`) or the live model of the training callback (whose "directory" is the index) reads the same files
from the index: the recorded index path as is, then the index's folder name beside the model directory
(`runs/x/model` -> `runs/x/index`).
What is missing is reported once per model, with what it costs (`heldout_missing`, `mentions_missing`).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .mentions import (FACTS_FILE, MENTIONS_DIR, MentionIndex, index_training_split, stored_mentions,
                       write_mention_dir)

HELDOUT_SPLIT = "val"


def _shards(folder: Path, split: str = HELDOUT_SPLIT) -> list[Path]:
    return sorted((folder / "shards").glob(f"{split}-*.safetensors")) if (folder / "shards").is_dir() else []


def write_eval_data(index_dir: Path, out: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Copy the evaluation data of `index_dir` into the model directory being written at `out`.

    Returns (model.json's `eval_data` entry, {relative path: sha256} of the files written)."""
    from ..utils import sha256_file

    index_dir, out = Path(index_dir), Path(out)
    index_meta = json.loads((index_dir / "index.json").read_text(encoding="utf-8"))
    entry: dict[str, Any] = {"heldout": None, "node_stats": None, "mentions": None, "recorded_counts": None}
    files: list[Path] = []
    val = _shards(index_dir)
    if val and int(index_meta.get("counts", {}).get("val_sequences", 0)) > 0:
        (out / "shards").mkdir(parents=True, exist_ok=True)
        for f in val:
            shutil.copyfile(f, out / "shards" / f.name)
            files.append(out / "shards" / f.name)
        entry["heldout"] = {"shards": "shards", "split": HELDOUT_SPLIT,
                            "sequences": int(index_meta["counts"]["val_sequences"])}
    if (index_dir / "node_stats.safetensors").is_file():
        shutil.copyfile(index_dir / "node_stats.safetensors", out / "node_stats.safetensors")
        files.append(out / "node_stats.safetensors")
        entry["node_stats"] = "node_stats.safetensors"
    mentions_entry, why = _mentions_into(index_dir, index_meta, out / MENTIONS_DIR)
    if mentions_entry is not None:
        entry["mentions"] = mentions_entry
    else:
        entry["mentions_missing"] = why
    if (out / MENTIONS_DIR / FACTS_FILE).is_file():
        entry["recorded_counts"] = f"{MENTIONS_DIR}/{FACTS_FILE}"
    if (out / MENTIONS_DIR).is_dir():
        files += sorted((out / MENTIONS_DIR).iterdir())
    return entry, {f.relative_to(out).as_posix(): sha256_file(f) for f in files}


def _mentions_into(index_dir: Path, index_meta: dict[str, Any], folder: Path) -> tuple[dict[str, Any] | None, str]:
    """Fill the model's mentions folder from the index: a copy of the folder `hmlm index` stored, or, for an index
    made before indexes stored one, the folder built from its corpus (while the corpus exists). Returns (model.json's
    `eval_data.mentions` entry, or None and why there is no word index)."""
    stored = index_meta.get("mentions")
    if stored is not None:
        source = index_dir / MENTIONS_DIR
        if source.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            for f in sorted(source.iterdir()):
                shutil.copyfile(f, folder / f.name)
        if stored.get("missing") or not (folder / "words.safetensors").is_file():
            return None, stored.get("missing") or f"the index's {source} is missing"
        return {"dir": MENTIONS_DIR, "words": stored["words"], "documents": stored["documents"],
                "paths": "paths.safetensors"}, ""
    mentions, why = index_training_split(index_dir)
    facts = Path(index_meta["corpus"]).parent / FACTS_FILE
    # repeat counts describe the whole bundled corpus: a max_docs subset states fewer sentences
    facts = facts if facts.is_file() and not index_meta.get("data", {}).get("max_docs") else None
    if mentions is not None or facts is not None:
        write_mention_dir(folder, mentions, training_paths_of_index(index_dir) if mentions is not None else None,
                          facts)
    if mentions is None:
        return None, why
    return {"dir": MENTIONS_DIR, "words": mentions.n_words, "documents": mentions.n_documents,
            "paths": "paths.safetensors"}, ""


def training_paths_of_index(index_dir: Path) -> np.ndarray:
    """[training documents, levels] tree paths (global node ids, int32) in the training split's order, the order of
    the mention index's documents."""
    paths = []
    with open(Path(index_dir) / "documents.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if doc["split"] == "train":
                paths.append(doc["path"])
    return np.asarray(paths, dtype=np.int32).reshape(len(paths), -1)


def find_index(loaded) -> Path | None:
    """The index a model was trained from, for model directories without `eval_data`: the recorded path if it is
    absolute, the folder of that name beside the model directory, the recorded path from the working directory, or
    the loaded "directory" itself (the training callback's); the first whose fingerprint is the model's."""
    recorded = (loaded.meta.get("index") or {})
    index = Path(str(recorded.get("dir") or ""))
    if not str(index):
        return None
    model = Path(loaded.path)
    candidates = [index] if index.is_absolute() else [model.parent / index.name, index]
    for candidate in [*candidates, model]:
        meta = candidate / "index.json"
        if meta.is_file() and recorded.get("fingerprint") in (None, json.loads(meta.read_text(
                encoding="utf-8")).get("fingerprint")):
            return candidate
    return None


@dataclass
class EvalData:
    """Where one loaded model's evaluation data lies, and why a piece is missing (said once, by the report)."""

    label: str
    heldout: Path | None = None        # folder with shards/val-*.safetensors and node_stats.safetensors
    mentions: Path | None = None       # mentions/ folder of a model directory (or of its index)
    index: Path | None = None          # the index of a model directory without eval_data (older exports)
    recorded: Path | None = None       # facts_meta.json
    heldout_missing: str | None = None     # why there is no held-out perplexity
    mentions_missing: str | None = None    # why entity mentions cannot be counted, once something asked
    _why_no_mentions: str | None = field(default=None, repr=False)
    _mentions: MentionIndex | None = field(default=None, init=False, repr=False)

    @classmethod
    def of(cls, loaded) -> "EvalData":
        meta = loaded.meta
        entry = meta.get("eval_data")
        data = cls(str(loaded.path))
        if entry is not None:
            root = Path(loaded.path)
            if entry.get("heldout") and entry.get("node_stats") and _shards(root):
                data.heldout = root
            else:
                data.heldout_missing = ("the model directory has no held-out split (trained with "
                                        "data.val_fraction=0?): held-out perplexity is left out")
            if entry.get("mentions") and (root / entry["mentions"]["dir"] / "words.safetensors").is_file():
                data.mentions = root / entry["mentions"]["dir"]
            else:
                data._why_no_mentions = entry.get("mentions_missing") or "its mentions/ folder is missing"
            if entry.get("recorded_counts") and (root / entry["recorded_counts"]).is_file():
                data.recorded = root / entry["recorded_counts"]
            return data
        data.index = find_index(loaded)
        if data.index is None:
            why = (f"the model directory has no evaluation data (written by an older hmlm) and its index "
                   f"{(meta.get('index') or {}).get('dir')!r} is not found; re-run `hmlm fit` to export a "
                   "self-contained model")
            data.heldout_missing = f"{why}: held-out perplexity is left out"
            data._why_no_mentions = why
            return data
        if _shards(data.index) and (data.index / "node_stats.safetensors").is_file():
            data.heldout = data.index
        else:
            data.heldout_missing = f"the index {data.index} has no held-out split: held-out perplexity is left out"
        data.mentions = stored_mentions(data.index)   # an index that stores its mentions: read as a model's
        corpus = Path(json.loads((data.index / "index.json").read_text(encoding="utf-8"))["corpus"])
        max_docs = (meta.get("recipe") or {}).get("data", {}).get("max_docs")
        for facts in (data.index / MENTIONS_DIR / FACTS_FILE, corpus.parent / FACTS_FILE):
            if not max_docs and facts.is_file():
                data.recorded = facts
                break
        return data

    def mention_index(self) -> MentionIndex | None:
        """The training split's word index (loaded, or built from the index's corpus, once); None when there is
        none, with the reason in `mentions_missing`."""
        if self._mentions is None and self.mentions_missing is None:
            why = self._why_no_mentions
            if self.mentions is not None:
                self._mentions = MentionIndex.load(self.mentions)
            elif self.index is not None:
                self._mentions, why = index_training_split(self.index)
            if self._mentions is None:
                self.mentions_missing = (f"entity mentions cannot be counted ({why}): items without a recorded "
                                         "count get no frequency bucket")
        return self._mentions

    def training_paths(self) -> np.ndarray | None:
        """[training documents, levels] tree paths in the mention index's document order (from the model directory,
        else from the index's documents.jsonl); None when neither is there, with the reason in `mentions_missing`."""
        if self.mentions is not None and (self.mentions / "paths.safetensors").is_file():
            from safetensors.numpy import load_file

            return load_file(str(self.mentions / "paths.safetensors"))["paths"]
        if self.index is not None and self.mentions is None:
            return training_paths_of_index(self.index)
        self.mentions_missing = self.mentions_missing or (
            "the model directory has no mentions/paths.safetensors (exported before hmlm recorded the training "
            "documents' paths) and its index is not found; re-run `hmlm fit` to export it")
        return None

    def recorded_counts(self) -> dict[tuple[str, str], int] | None:
        """(relation, entity_key) -> repeat count from facts_meta.json; None without one."""
        if self.recorded is None:
            return None
        facts = json.loads(self.recorded.read_text(encoding="utf-8"))["facts"]
        return {(f["relation"], f["entity_key"]): int(f["repeat_count"]) for f in facts}

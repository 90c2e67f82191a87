"""`hmlm index`: corpus -> embeddings -> hierarchical k-means tree -> per-document paths -> packed token shards.

The index directory is written atomically (built in a temp dir, renamed at the end) and is everything training needs:

    index.json              config fingerprint, embedder identity, tree shape, counts, versions, sha256 of every file
    tree.safetensors        router centroids (one tensor per level)
    documents.jsonl         per document: id, split (train/val), path (one node id per level), tokens
    node_stats.safetensors  per level: documents and tokens routed to each node (training split)
    tokenizer/              tokenizer.json + meta
    shards/                 train-*.safetensors, val-*.safetensors: packed sequences with doc ids and paths
    mentions/               the training split's word index and document paths (+ the bundled corpus's recorded
                            repeat counts), copied into every model directory (hmlm.eval.mentions): entity counts
                            and `hmlm inspect --entity` work wherever the index goes, with or without its corpus
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from rich.console import Console
from safetensors.numpy import save_file

from . import registry
from .config import Recipe
from .data.corpus import read_corpus
from .data.packing import pack_by_leaf, write_shards
from .data.tokenizer import Tokenizer, build_tokenizer
from .embedders import fingerprint_fields as embedder_fingerprint
from .eval.mentions import FACTS_FILE, MENTIONS_DIR, training_split_mentions, write_mention_dir
from .plugin_config import create
from .utils import (FileLock, atomic_dir, read_json_artifact, recover_atomic_dir, sha256_file, verify_checksums, versions,
                    write_json)

INDEX_FORMAT = 1


class IndexError_(RuntimeError):
    """An index that exists but does not match the recipe, or is corrupt."""


def fingerprint(recipe: Recipe) -> str:
    """Everything that changes the index's content. Training-only keys are left out on purpose."""
    data = asdict(recipe.data)
    data.pop("num_workers", None)
    data.pop("doc_mask", None)  # the shards always carry doc ids; masking is a training-time choice
    key = {"data": data, "embedder": _without_empty_options(embedder_fingerprint(recipe.index.embedder)),
           "router": _without_empty_options(asdict(recipe.index.router)), "seed": recipe.seed, "format": INDEX_FORMAT}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _without_empty_options(section: dict[str, Any]) -> dict[str, Any]:
    # plugin options change the index, but an empty mapping must not: indexes built before plugins took options
    # keep their fingerprint
    if not section.get("options"):
        section.pop("options", None)
    return section


def corpus_path(recipe: Recipe) -> Path:
    if recipe.data.corpus == "bundled":
        from .data.bundled import build_bundled_corpus

        return build_bundled_corpus(seed=recipe.seed)
    return Path(recipe.data.corpus)


def build_embedder(recipe: Recipe):
    return create("embedders", recipe, "from_config", recipe.index.embedder, seed=recipe.seed)


def build_router(recipe: Recipe):
    return create("routers", recipe, "from_config", recipe.index.router, seed=recipe.seed)


def load_router(recipe_or_name: Recipe | str, path: Path):
    name = recipe_or_name if isinstance(recipe_or_name, str) else recipe_or_name.index.router.name
    return registry.get("routers", name).load(path)


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation documents (seeded; at least one when a fraction is asked and n_docs >= 2)."""
    is_val = np.zeros(n_docs, dtype=bool)
    n_val = int(round(n_docs * val_fraction))
    if val_fraction > 0 and n_docs >= 2:
        n_val = max(1, n_val)
    if n_val:
        rng = np.random.default_rng([seed, 7])
        is_val[rng.choice(n_docs, size=n_val, replace=False)] = True
    return is_val


def ensure_index(recipe: Recipe, console: Console | None = None, *, rebuild: bool = False, verify: bool = False,
                 progress: bool = True) -> Path:
    """Return the recipe's index dir, building it when it does not exist (or when `rebuild`)."""
    with use_index(recipe, console, rebuild=rebuild, verify=verify, progress=progress) as out:
        return out


@contextlib.contextmanager
def use_index(recipe: Recipe, console: Console | None = None, *, rebuild: bool = False, verify: bool = True,
              progress: bool = True) -> Iterator[Path]:
    """Hold the recipe's index for reading (building it first if needed) for the duration of the block.

    An advisory lock beside the index (`.<name>.lock`) is held shared while the index is read and exclusively while
    it is built or repaired, so two fits sharing an index dir never build it twice or read a half-replaced one, and
    `hmlm index --rebuild` refuses while a fit trains on it. With `verify`, every file's sha256 is checked against
    index.json before the block runs (once per fit, not per read).
    """
    console = console or Console()
    out = Path(recipe.index.dir)
    lock = FileLock(out.with_name(f".{out.name}.lock"))
    try:
        _acquire_index(lock, out, recipe, console, rebuild)
        meta = check_index(out, recipe)
        if verify:
            verify_index(out, meta, progress=progress)
        yield out
    finally:
        lock.release()


def _acquire_index(lock: FileLock, out: Path, recipe: Recipe, console: Console, rebuild: bool) -> None:
    waited = False
    while True:
        if lock.acquire(shared=False):  # nobody else reads or writes this index: repair, build, then share it
            for note in recover_atomic_dir(out):
                console.print(f"[yellow]index[/] {note}")
            if rebuild or not out.exists():
                build_index(recipe, console)
            lock.acquire(shared=True)
            return
        if rebuild:
            raise IndexError_(f"{out}: in use by another hmlm process (a running fit or index build); run "
                              "`hmlm index --rebuild` once it has finished, or set index.dir to another path")
        if out.exists() and lock.acquire(shared=True):
            return
        if not waited:
            console.print(f"[yellow]index[/] waiting for another hmlm process that is writing {out}")
            waited = True
        time.sleep(0.5)


def check_index(path: Path, recipe: Recipe) -> dict[str, Any]:
    if path.exists() and not path.is_dir():
        raise IndexError_(f"{path}: key `index.dir` names a file, not a directory; set index.dir to a directory")
    meta = read_index_meta(path)
    if meta.get("fingerprint") != fingerprint(recipe):
        raise IndexError_(f"{path}: this index was built with other data/index settings than the recipe "
                          f"(fingerprint {meta.get('fingerprint')} != {fingerprint(recipe)}); run "
                          f"`hmlm index --recipe ... --rebuild` or point index.dir elsewhere")
    return meta


def built_for_other_settings(path: Path, recipe: Recipe) -> bool:
    """Whether `path` holds a readable index built with other data/index settings than `recipe` (False when there is
    no index there, or one whose description cannot be read: using it reports that)."""
    try:
        meta = read_index_meta(path)
    except IndexError_:
        return False
    return meta.get("fingerprint") != fingerprint(recipe)


def read_index_meta(path: Path) -> dict[str, Any]:
    meta = read_json_artifact(Path(path) / "index.json", IndexError_,
                              missing="exists but has no index.json (a corrupt or foreign directory); delete it or "
                                      "set index.dir to another path",
                              corrupt_hint="; delete the index directory to rebuild it")
    if not isinstance(meta, dict):
        raise IndexError_(f"{Path(path) / 'index.json'}: not an index description (a JSON object); delete the index "
                          "directory to rebuild it")
    return meta


def verify_index(path: Path, meta: dict[str, Any], *, progress: bool = True) -> None:
    """Every file the index lists matches its recorded sha256, and no unlisted shard would be read."""
    path = Path(path)
    meta_path = path / "index.json"
    fix = f"rebuild the index (`hmlm index --recipe ... --rebuild`, or delete {path})"
    sums = meta.get("checksums")
    if not isinstance(sums, dict) or not sums:
        raise IndexError_(f"{meta_path}: key `checksums` is missing, so the index cannot be verified; {fix}, or "
                          "train without verifying (`hmlm fit --no-verify`)")
    shards = meta.get("shards") if isinstance(meta.get("shards"), dict) else {}
    listed = {f"shards/{f}" for split in ("train", "val") for f in shards.get(split, [])}
    shard_dir = path / "shards"
    on_disk = {f"shards/{p.name}" for p in shard_dir.glob("*.safetensors")
               if re.fullmatch(r"(train|val)-\d{5}\.safetensors", p.name)} if shard_dir.is_dir() else set()
    unlisted = sorted((on_disk - listed) | (listed - set(sums)))
    if unlisted:
        raise IndexError_(f"{path / unlisted[0]}: shard not covered by the `checksums` of {meta_path} (training would "
                          f"read it unverified); {fix}")
    verify_checksums(path, sums, IndexError_, listed_in=meta_path, fix=fix, progress=progress)


def build_index(recipe: Recipe, console: Console) -> Path:
    t0 = time.perf_counter()
    out = Path(recipe.index.dir)
    src = corpus_path(recipe)
    console.print(f"[bold]index[/] reading corpus {src}")
    docs = read_corpus(src, max_docs=recipe.data.max_docs)
    texts = [d.text for d in docs]
    is_val = split_documents(len(docs), recipe.data.val_fraction, recipe.seed)
    if recipe.data.val_fraction > 0 and not is_val.any():
        raise IndexError_(f"{src}: key `data.val_fraction` ({recipe.data.val_fraction}) holds out no document of this "
                          f"{len(docs)}-document corpus, so there would be no validation split; set "
                          "data.val_fraction=0 to train without validation, or use a corpus of at least 2 documents")
    train_idx = np.flatnonzero(~is_val)
    console.print(f"[bold]index[/] {len(docs):,} documents ({int(is_val.sum()):,} held out for validation)")

    embedder = build_embedder(recipe)
    console.print(f"[bold]index[/] embedding with `{recipe.index.embedder.name}`")
    # identical texts (common in web crawls; the bundled facts repeat on purpose) are embedded once
    unique: dict[str, int] = {}
    slot = np.fromiter((unique.setdefault(t, len(unique)) for t in texts), dtype=np.int64, count=len(texts))
    emb = embedder.embed(list(unique), progress=True).astype(np.float32)[slot]

    rc = recipe.index.router
    console.print(f"[bold]index[/] fitting `{rc.name}`: k={rc.branching}, levels={rc.levels}")
    router = build_router(recipe).fit(emb[train_idx], progress=True)
    paths = router.route(emb).astype(np.int64)

    console.print(f"[bold]index[/] tokenizer: {recipe.data.tokenizer.kind}")
    rng = np.random.default_rng([recipe.seed, 11])
    tok_docs = train_idx
    if recipe.data.tokenizer.train_docs and len(train_idx) > recipe.data.tokenizer.train_docs:
        tok_docs = np.sort(rng.choice(train_idx, size=recipe.data.tokenizer.train_docs, replace=False))
    tokenizer = build_tokenizer(recipe.data.tokenizer, [texts[i] for i in tok_docs], seed=recipe.seed)
    encoded = [np.asarray(ids + [tokenizer.eos_id], dtype=np.int64) for ids in tokenizer.encode_batch(list(unique))]
    token_docs = [encoded[i] for i in slot]   # each distinct text encoded once, as it is embedded once
    n_tokens = np.array([len(t) for t in token_docs], dtype=np.int64)

    with atomic_dir(out) as tmp:
        router.save(tmp / "tree.safetensors")
        tokenizer.save(tmp / "tokenizer")
        shards: dict[str, list[str]] = {}
        sums: dict[str, str] = {}
        seq_counts: dict[str, int] = {}
        for split, idx in (("train", train_idx), ("val", np.flatnonzero(is_val))):
            if len(idx) == 0:
                shards[split] = []
                seq_counts[split] = 0
                continue
            packed = pack_by_leaf([token_docs[i] for i in idx], paths[idx], recipe.data.seq_len,
                                  eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=recipe.seed)
            written = write_shards(packed, tmp / "shards", split)
            shards[split] = [w["file"] for w in written]
            sums.update({f"shards/{w['file']}": w["sha256"] for w in written})
            seq_counts[split] = int(packed.tokens.shape[0])
        stats = _node_stats(paths[train_idx], n_tokens[train_idx], rc.branching)
        save_file(stats, str(tmp / "node_stats.safetensors"))
        with open(tmp / "documents.jsonl", "w", encoding="utf-8") as f:
            for i, d in enumerate(docs):
                f.write(json.dumps({"id": d.id, "split": "val" if is_val[i] else "train",
                                    "path": paths[i].tolist(), "tokens": int(n_tokens[i])}) + "\n")
        for name in ("tree.safetensors", "node_stats.safetensors", "documents.jsonl"):
            sums[name] = sha256_file(tmp / name)
        mentions_entry = _write_mentions(tmp, src, recipe, [texts[i] for i in train_idx], paths[train_idx],
                                         int(n_tokens[train_idx].sum()), sums)
        for p in sorted((tmp / "tokenizer").iterdir()):
            sums[f"tokenizer/{p.name}"] = sha256_file(p)
        meta = {
            "format": INDEX_FORMAT,
            "fingerprint": fingerprint(recipe),
            "corpus": str(src),
            "data": asdict(recipe.data),
            "embedder": embedder.identity(),
            "router": {"name": rc.name, "branching": rc.branching, "levels": rc.levels,
                       "fit_stats": getattr(router, "fit_stats", {})},
            "tokenizer": {"kind": recipe.data.tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                          "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id},
            "counts": {"documents": len(docs), "val_documents": int(is_val.sum()),
                       "train_tokens": int(n_tokens[train_idx].sum()), "val_tokens": int(n_tokens[is_val].sum()),
                       "train_sequences": seq_counts["train"], "val_sequences": seq_counts["val"]},
            "shards": shards,
            "mentions": mentions_entry,
            "seq_len": recipe.data.seq_len,
            "checksums": sums,
            "versions": versions(),
            "seed": recipe.seed,
            "build_seconds": round(time.perf_counter() - t0, 1),
        }
        write_json(tmp / "index.json", meta)
    c = meta["counts"]
    console.print(f"[bold]index[/] wrote {out}: {c['train_sequences']:,} train / {c['val_sequences']:,} val sequences "
                  f"of {recipe.data.seq_len} tokens, {c['train_tokens']:,} train tokens, vocab "
                  f"{tokenizer.vocab_size:,} ({meta['build_seconds']} s)")
    return out


def _write_mentions(tmp: Path, corpus: Path, recipe: Recipe, train_texts: list[str], train_paths: np.ndarray,
                    train_tokens: int, sums: dict[str, str]) -> dict[str, Any]:
    """The index's mentions/ folder (hmlm.eval.mentions); returns index.json's `mentions` entry: where the word index
    is, or why there is none (a training split larger than MAX_WORDS)."""
    mentions, why = training_split_mentions(train_texts, train_tokens)
    facts = corpus.parent / FACTS_FILE
    # repeat counts describe the whole bundled corpus: a max_docs subset states fewer sentences
    facts = facts if facts.is_file() and not recipe.data.max_docs else None
    if mentions is None and facts is None:
        return {"missing": why}
    written = write_mention_dir(tmp / MENTIONS_DIR, mentions, train_paths if mentions is not None else None, facts)
    sums.update({f"{MENTIONS_DIR}/{name}": digest for name, digest in written.items()})
    entry: dict[str, Any] = {"dir": MENTIONS_DIR, "recorded_counts": facts is not None}
    if mentions is None:
        return {**entry, "missing": why}
    return {**entry, "words": mentions.n_words, "documents": mentions.n_documents}


def _node_stats(paths: np.ndarray, n_tokens: np.ndarray, k: int) -> dict[str, np.ndarray]:
    stats = {}
    for lvl in range(paths.shape[1]):
        nodes = k ** (lvl + 1)
        stats[f"level{lvl + 1}_docs"] = np.bincount(paths[:, lvl], minlength=nodes).astype(np.int64)
        stats[f"level{lvl + 1}_tokens"] = np.bincount(paths[:, lvl], weights=n_tokens, minlength=nodes).astype(np.int64)
    return stats


def vocab_size_for(recipe: Recipe) -> int:
    """The anchor's vocabulary: anchor.vocab_size, else the built index's tokenizer, else what the tokenizer settings
    will give (padded to a multiple of 64)."""
    from .data.tokenizer import padded_vocab_size

    if recipe.anchor.vocab_size:
        return recipe.anchor.vocab_size
    if (Path(recipe.index.dir) / "index.json").is_file():
        return padded_vocab_size(read_index_meta(Path(recipe.index.dir))["tokenizer"]["vocab_size"])
    if recipe.data.tokenizer.kind == "gpt2":
        return padded_vocab_size(50258)  # GPT-2's 50,257 + our pad token
    return padded_vocab_size(recipe.data.tokenizer.vocab_size)


def load_tokenizer(index_dir: Path) -> Tokenizer:
    return Tokenizer.load(Path(index_dir) / "tokenizer")

"""Pack the documents of each tree leaf into fixed-length sequences, and store/read them as shards.

Memory is fetched per sequence from the sequence's path, so a sequence must hold documents of one
leaf only. Within a leaf, documents are concatenated in corpus order and cut every `seq_len`
tokens. Each document must already end with EOS (the caller appends it after tokenizing; the packer
checks), so the model learns to end documents. A document that crosses a cut continues at the
start of the leaf's next sequence. Only a leaf's last sequence is padded.

`doc_ids[s, t]` numbers the documents inside sequence s: 0 for the first (possibly the tail of a
document begun in the previous sequence), 1 for the next, ...; -1 marks padding. Two positions with
the same value belong to the same document, and an EOS belongs to the document it ends. This is
what the anchor's per-document causal mask is built from.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save as st_save
from torch.utils.data import Dataset

from ..utils import atomic_write_path

FORMAT = "hmlm-packed-v1"
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


@dataclass
class PackedSequences:
    """S packed sequences. tokens [S, seq_len] (uint16 when every id fits, else int32),
    doc_ids [S, seq_len] (int16 or int32, -1 = padding), paths [S, L] int64 (one node id per level)."""

    tokens: np.ndarray
    doc_ids: np.ndarray
    paths: np.ndarray

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.doc_ids.shape != self.tokens.shape:
            raise ValueError(f"tokens {self.tokens.shape} and doc_ids {self.doc_ids.shape} must be equal 2-D shapes")
        if self.paths.ndim != 2 or len(self.paths) != len(self.tokens):
            raise ValueError(f"paths {self.paths.shape} must be [S, L] with S = {len(self.tokens)}")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def n_tokens(self) -> int:
        """Non-padding tokens (EOS included)."""
        return int((self.doc_ids >= 0).sum())


def pack_by_leaf(token_docs: list[np.ndarray], leaf_paths: np.ndarray, seq_len: int, eos_id: int,
                 pad_id: int, seed: int) -> PackedSequences:
    """Pack documents (token ids, each ending with `eos_id`) by leaf; sequences are then shuffled with `seed`.

    leaf_paths [N_docs, L]: each document's path (node id per level); documents with equal rows
    share a leaf. Leaves are laid out in sorted path order before the shuffle, so the result
    depends only on the inputs and the seed.
    """
    leaf_paths = np.asarray(leaf_paths, dtype=np.int64)
    if leaf_paths.ndim != 2 or len(leaf_paths) != len(token_docs):
        raise ValueError(f"leaf_paths must be [N_docs, L] with N_docs = {len(token_docs)}, got {leaf_paths.shape}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (inputs and labels are shifted by one), got {seq_len}")
    n_docs, levels = leaf_paths.shape
    if n_docs == 0:
        return PackedSequences(np.zeros((0, seq_len), np.uint16), np.zeros((0, seq_len), np.int16),
                               np.zeros((0, levels), np.int64))

    # group documents by leaf; a stable sort keeps corpus order inside each leaf
    leaves, leaf_of_doc = np.unique(leaf_paths, axis=0, return_inverse=True)
    leaf_of_doc = leaf_of_doc.reshape(-1)
    order = np.argsort(leaf_of_doc, kind="stable")
    sorted_leaf = leaf_of_doc[order]
    lengths = np.array([len(token_docs[i]) for i in order], dtype=np.int64)

    # each leaf fills whole sequences: its stream is padded up to a multiple of seq_len, so leaves
    # never share a sequence and laying the leaves' streams end to end gives the [S * seq_len] buffer
    leaf_tokens = np.bincount(sorted_leaf, weights=lengths, minlength=len(leaves)).astype(np.int64)
    leaf_seqs = -(-leaf_tokens // seq_len)
    leaf_pad = leaf_seqs * seq_len - leaf_tokens
    # padding to add after each ordered document: its leaf's padding if it is the leaf's last document
    last_of_leaf = np.append(sorted_leaf[1:] != sorted_leaf[:-1], True)
    pad_after = np.where(last_of_leaf, leaf_pad[sorted_leaf], 0)
    pieces: list[np.ndarray] = []
    seg_rank: list[int] = []  # per segment: rank of the document in `order`, or -1 for padding
    seg_len: list[int] = []
    # plain Python ints in the loop: numpy scalar indexing per document would dominate the run time
    for r, (i, n, pad) in enumerate(zip(order.tolist(), lengths.tolist(), pad_after.tolist())):
        doc = np.asarray(token_docs[i], dtype=np.int64).reshape(-1)
        if n == 0 or doc[-1] != eos_id:
            raise ValueError(f"document {i} does not end with eos_id={eos_id} (last token: "
                             f"{int(doc[-1]) if n else 'none, it is empty'}); append EOS to every document")
        pieces.append(doc)
        seg_rank.append(r)
        seg_len.append(n)
        if pad:
            pieces.append(np.full(pad, pad_id, dtype=np.int64))
            seg_rank.append(-1)
            seg_len.append(pad)
    flat = np.concatenate(pieces)
    if flat.min() < 0 or pad_id < 0:
        raise ValueError(f"token ids must be >= 0 (got {int(flat.min())}; eos_id {eos_id}, pad_id {pad_id})")

    n_seqs = int(leaf_seqs.sum())
    tokens = flat.reshape(n_seqs, seq_len)
    rank = np.repeat(np.array(seg_rank, dtype=np.int64), seg_len).reshape(n_seqs, seq_len)
    # a leaf's sequences are filled from position 0, so position 0 always holds the row's first document
    doc_ids = np.where(rank >= 0, rank - rank[:, :1], -1)
    paths = leaves[np.repeat(np.arange(len(leaves)), leaf_seqs)]

    perm = np.random.default_rng(seed).permutation(n_seqs)
    tok_dtype = np.uint16 if max(int(tokens.max()), eos_id, pad_id) <= np.iinfo(np.uint16).max else np.int32
    doc_dtype = np.int16 if seq_len <= np.iinfo(np.int16).max else np.int32
    return PackedSequences(tokens[perm].astype(tok_dtype), doc_ids[perm].astype(doc_dtype), paths[perm])


def _shard_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i:05d}.safetensors"


def write_shards(packed: PackedSequences, out_dir: str | Path, prefix: str,
                 max_rows_per_shard: int = 65536) -> list[dict[str, Any]]:
    """Write `{prefix}-00000.safetensors`, ... atomically; returns [{file, sha256, rows}] per shard.

    Earlier shards of the same prefix that this call does not overwrite are removed, so a reader
    never mixes two packings. An empty `packed` still writes one (empty) shard that carries the shapes.
    """
    if max_rows_per_shard < 1:
        raise ValueError(f"max_rows_per_shard must be >= 1, got {max_rows_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "seq_len": str(packed.seq_len), "levels": str(packed.paths.shape[1])}
    starts = range(0, max(len(packed), 1), max_rows_per_shard)
    written = []
    for i, a in enumerate(starts):
        b = a + max_rows_per_shard
        data = st_save({"tokens": np.ascontiguousarray(packed.tokens[a:b]),
                        "doc_ids": np.ascontiguousarray(packed.doc_ids[a:b]),
                        "paths": np.ascontiguousarray(packed.paths[a:b])}, metadata=meta)
        name = _shard_name(prefix, i)
        _atomic_write_bytes(out / name, data)
        written.append({"file": name, "sha256": hashlib.sha256(data).hexdigest(),
                        "rows": int(min(b, len(packed)) - a)})
    keep = {w["file"] for w in written}
    for stale in _shard_files(out, prefix):
        if stale.name not in keep:
            stale.unlink()
    return written


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shard_files(directory: Path, prefix: str) -> list[Path]:
    pattern = re.compile(re.escape(prefix) + r"-\d{5}\.safetensors")
    return sorted(p for p in directory.iterdir() if pattern.fullmatch(p.name))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_write_path(path) as tmp:
        tmp.write_bytes(data)


class SequenceShards(Dataset):
    """Read-only map-style Dataset over `{prefix}-*.safetensors` in `directory`.

    Rows are read one at a time from memory-mapped shards, so the packed corpus never has to fit in
    memory. Item i is {input_ids, labels, doc_ids: LongTensor[seq_len-1], path: LongTensor[L]} with
    input_ids = tokens[:-1], labels = tokens[1:] (-100 where the target is padding) and
    doc_ids = doc_ids[:-1].
    """

    def __init__(self, directory: str | Path, prefix: str):
        self.directory = Path(directory)
        self.prefix = prefix
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: shard directory does not exist")
        self.files = _shard_files(self.directory, prefix)
        if not self.files:
            raise FileNotFoundError(f"{self.directory}: no shards named {_shard_name(prefix, 0)}, ... "
                                    "(write them with write_shards or `hmlm index`)")
        rows, shapes = [], set()
        for f in self.files:
            with safe_open(str(f), framework="numpy") as h:
                meta = h.metadata() or {}
                if meta.get("format") != FORMAT or set(h.keys()) != {"tokens", "doc_ids", "paths"}:
                    raise ValueError(f"{f}: not a packed-sequence shard of format {FORMAT}")
                rows.append(h.get_slice("tokens").get_shape()[0])
                shapes.add((int(meta["seq_len"]), int(meta["levels"])))
        if len(shapes) != 1:
            raise ValueError(f"{self.directory}: shards of prefix {prefix!r} disagree on (seq_len, levels): "
                             f"{sorted(shapes)}; re-run the packing")
        self.seq_len, self.levels = shapes.pop()
        self.offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _handle(self, shard: int) -> Any:
        # opened lazily, so each DataLoader worker opens its own after the dataset is pickled to it
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = safe_open(str(self.files[shard]), framework="numpy")
        return h

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}  # file handles don't pickle
        return state

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw (tokens [seq_len], doc_ids [seq_len], path [L]) of sequence i."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences")
        i %= n
        shard = int(np.searchsorted(self.offsets, i, side="right")) - 1
        r = i - int(self.offsets[shard])
        h = self._handle(shard)
        return h.get_slice("tokens")[r], h.get_slice("doc_ids")[r], h.get_slice("paths")[r]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens, doc_ids, path = self.row(i)
        tokens = torch.from_numpy(tokens.astype(np.int64))
        doc_ids = torch.from_numpy(doc_ids.astype(np.int64))
        labels = tokens[1:].clone()
        labels[doc_ids[1:] < 0] = IGNORE_INDEX  # padding is known from doc_ids, even if pad_id occurs in text
        return {"input_ids": tokens[:-1], "labels": labels, "doc_ids": doc_ids[:-1],
                "path": torch.from_numpy(path.astype(np.int64))}

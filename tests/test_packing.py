"""Packing by leaf: every token once, leaves never mixed, boundaries kept; shard write/read round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hmlm.data.packing import PackedSequences, SequenceShards, file_sha256, pack_by_leaf, write_shards

EOS, PAD = 1, 0


def make_docs(lengths: list[int]) -> list[np.ndarray]:
    """Document i's tokens are 1000*(i+1) + position, then EOS: every token says which document and where."""
    return [np.append(np.arange(n, dtype=np.int64) + 1000 * (i + 1), EOS) for i, n in enumerate(lengths)]


def unpack(packed: PackedSequences) -> dict[tuple, list[list[int]]]:
    """Rebuild each leaf's documents (as token lists, EOS stripped) from the packed sequences."""
    per_leaf: dict[tuple, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for s in range(len(packed)):
        per_leaf.setdefault(tuple(packed.paths[s]), []).append((s, packed.tokens[s], packed.doc_ids[s]))
    out = {}
    for leaf, rows in per_leaf.items():
        # restore stream order from the tokens themselves: a leaf's rows hold increasing (doc, pos) codes.
        # With non-empty documents only a leaf's last row can lack a code ([EOS, PAD, ...]); it goes last.
        def first_code(row: tuple) -> int:
            toks, ids = row[1], row[2]
            codes = toks[(toks != EOS) & (ids >= 0)]
            return int(codes[0]) if len(codes) else 10**9
        rows.sort(key=first_code)
        docs: list[list[int]] = []
        current: list[int] = []
        for _, toks, ids in rows:
            for t, d in zip(toks.tolist(), ids.tolist()):
                if d < 0:
                    continue
                if t == EOS:
                    docs.append(current)
                    current = []
                else:
                    current.append(t)
        assert current == [], "a leaf's stream must end with EOS"
        out[leaf] = docs
    return out


def check_packing(lengths: list[int], leaves: np.ndarray, seq_len: int, seed: int) -> PackedSequences:
    docs = make_docs(lengths)
    packed = pack_by_leaf(docs, leaves, seq_len, EOS, PAD, seed)
    S = len(packed)
    assert packed.tokens.shape == (S, seq_len) and packed.doc_ids.shape == (S, seq_len)
    assert packed.paths.shape == (S, leaves.shape[1]) and packed.paths.dtype == np.int64
    assert packed.n_tokens == sum(lengths) + len(lengths)  # every token, EOS included
    valid = packed.doc_ids >= 0
    # padding only at the end of a row, with pad_id; position 0 is never padding
    assert np.all(packed.tokens[~valid] == PAD)
    assert np.all(valid[:, 0])
    assert np.all(np.diff(valid.astype(np.int8), axis=1) <= 0)
    for s in range(S):
        ids = packed.doc_ids[s][valid[s]]
        # doc_ids start at 0 in every row and go up by one at each document boundary (after an EOS)
        assert ids[0] == 0 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
        toks = packed.tokens[s][valid[s]]
        new_doc = np.flatnonzero(np.diff(ids)) + 1
        assert np.all(toks[new_doc - 1] == EOS), "a new document starts right after the previous one's EOS"
        # documents of different leaves never share a row: every token's document has this row's path
        doc_index = toks[toks != EOS] // 1000 - 1
        assert np.all((leaves[doc_index] == packed.paths[s]).all(axis=1))
    # only the last row of a leaf may be padded
    n_padded = {}
    for s in range(S):
        n_padded.setdefault(tuple(packed.paths[s]), []).append(bool((~valid[s]).any()))
    assert all(sum(p) <= 1 for p in n_padded.values())
    # every leaf's documents come back in corpus order, whole and contiguous
    rebuilt = unpack(packed)
    for leaf, got in rebuilt.items():
        members = [i for i in range(len(docs)) if tuple(leaves[i]) == leaf]
        assert got == [docs[i][:-1].tolist() for i in members]
    assert sum(len(v) for v in rebuilt.values()) == len(docs)
    return packed


def test_small_example():
    leaves = np.array([[0, 3], [1, 4], [0, 3], [0, 3]])
    packed = check_packing([3, 2, 5, 1], leaves, seq_len=4, seed=0)
    # leaf (0,3): 4+6+2 = 12 tokens -> 3 rows; leaf (1,4): 3 tokens -> 1 padded row
    assert len(packed) == 4
    rows = {tuple(map(int, packed.tokens[s])): (packed.doc_ids[s].tolist(), packed.paths[s].tolist())
            for s in range(4)}
    assert rows[(1000, 1001, 1002, EOS)] == ([0, 0, 0, 0], [0, 3])
    assert rows[(3000, 3001, 3002, 3003)] == ([0, 0, 0, 0], [0, 3])   # doc 3 crosses into the next row
    assert rows[(3004, EOS, 4000, EOS)] == ([0, 0, 1, 1], [0, 3])     # ... where it is document 0 again
    assert rows[(2000, 2001, EOS, PAD)] == ([0, 0, 0, -1], [1, 4])


def test_document_of_only_eos():
    packed = pack_by_leaf(make_docs([2, 0, 1]), np.zeros((3, 1), np.int64), 8, EOS, PAD, 0)
    assert packed.tokens[0].tolist() == [1000, 1001, EOS, EOS, 3000, EOS, PAD, PAD]
    assert packed.doc_ids[0].tolist() == [0, 0, 0, 1, 2, 2, -1, -1]


def test_shuffle_deterministic_under_seed():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 40, size=60).tolist()
    leaves = rng.integers(0, 3, size=(60, 2))
    a = pack_by_leaf(make_docs(lengths), leaves, 16, EOS, PAD, seed=5)
    b = pack_by_leaf(make_docs(lengths), leaves, 16, EOS, PAD, seed=5)
    c = pack_by_leaf(make_docs(lengths), leaves, 16, EOS, PAD, seed=6)
    for x in ("tokens", "doc_ids", "paths"):
        assert np.array_equal(getattr(a, x), getattr(b, x))
    assert not np.array_equal(a.tokens, c.tokens)
    # a different seed only reorders rows
    assert sorted(map(bytes, a.tokens)) == sorted(map(bytes, c.tokens))


def test_dtypes_and_validation():
    p = pack_by_leaf([np.array([5, 6, EOS])], np.array([[0]]), 8, EOS, PAD, 0)
    assert p.tokens.dtype == np.uint16 and p.doc_ids.dtype == np.int16
    big = pack_by_leaf([np.array([70000, EOS])], np.array([[0]]), 8, EOS, PAD, 0)
    assert big.tokens.dtype == np.int32 and big.tokens[0, 0] == 70000
    empty = pack_by_leaf([], np.zeros((0, 3), np.int64), 8, EOS, PAD, 0)
    assert len(empty) == 0 and empty.paths.shape == (0, 3)
    with pytest.raises(ValueError, match="leaf_paths must be"):
        pack_by_leaf([np.array([EOS])], np.zeros((2, 2)), 8, EOS, PAD, 0)
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        pack_by_leaf([np.array([EOS])], np.zeros((1, 2)), 1, EOS, PAD, 0)
    with pytest.raises(ValueError, match="token ids must be >= 0"):
        pack_by_leaf([np.array([-3, EOS])], np.zeros((1, 2)), 8, EOS, PAD, 0)
    with pytest.raises(ValueError, match="document 1 does not end with eos_id=1 \\(last token: 7\\)"):
        pack_by_leaf([np.array([5, EOS]), np.array([7])], np.zeros((2, 2)), 8, EOS, PAD, 0)
    with pytest.raises(ValueError, match="document 0 does not end with eos_id=1 \\(last token: none"):
        pack_by_leaf([np.array([], np.int64)], np.zeros((1, 2)), 8, EOS, PAD, 0)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=40),
    n_leaves=st.integers(1, 5),
    levels=st.integers(1, 3),
    seq_len=st.integers(2, 24),
    seed=st.integers(0, 2**16),
)
def test_packing_properties(lengths, n_leaves, levels, seq_len, seed):
    rng = np.random.default_rng(seed)
    leaves = rng.integers(0, n_leaves, size=(len(lengths), levels))
    check_packing(lengths, leaves, seq_len, seed)


def test_shards_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 30, size=50).tolist()
    leaves = rng.integers(0, 4, size=(50, 3))
    packed = pack_by_leaf(make_docs(lengths), leaves, 12, EOS, PAD, seed=0)
    info = write_shards(packed, tmp_path, "train", max_rows_per_shard=7)
    assert [i["file"] for i in info] == [f"train-{k:05d}.safetensors" for k in range(len(info))]
    assert sum(i["rows"] for i in info) == len(packed) and len(info) == -(-len(packed) // 7)
    assert all(file_sha256(tmp_path / i["file"]) == i["sha256"] for i in info)
    assert not list(tmp_path.glob(".*tmp"))

    ds = SequenceShards(tmp_path, "train")
    assert len(ds) == len(packed) and ds.seq_len == 12 and ds.levels == 3
    for s in range(len(packed)):
        item = ds[s]
        assert set(item) == {"input_ids", "labels", "doc_ids", "path"}
        assert all(v.dtype == torch.long for v in item.values())
        tokens = torch.from_numpy(packed.tokens[s].astype(np.int64))
        doc_ids = torch.from_numpy(packed.doc_ids[s].astype(np.int64))
        assert torch.equal(item["input_ids"], tokens[:-1])
        assert torch.equal(item["doc_ids"], doc_ids[:-1])
        assert torch.equal(item["path"], torch.from_numpy(packed.paths[s]))
        # labels are the next tokens, ignored exactly where the target is padding
        expect = tokens[1:].clone()
        expect[doc_ids[1:] < 0] = -100
        assert torch.equal(item["labels"], expect)
    assert (torch.stack([ds[s]["labels"] for s in range(len(ds))]) == -100).any()
    assert torch.equal(ds[-1]["input_ids"], ds[len(ds) - 1]["input_ids"])
    with pytest.raises(IndexError):
        ds[len(ds)]

    # works with a multi-worker DataLoader (handles reopen after pickling)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 11) and batch["path"].shape == (4, 3)


def test_rewrite_removes_stale_shards(tmp_path):
    packed = pack_by_leaf(make_docs([10] * 20), np.zeros((20, 1), np.int64), 8, EOS, PAD, 0)
    write_shards(packed, tmp_path, "train", max_rows_per_shard=5)
    write_shards(packed, tmp_path, "val", max_rows_per_shard=100)
    small = pack_by_leaf(make_docs([3]), np.zeros((1, 1), np.int64), 8, EOS, PAD, 0)
    write_shards(small, tmp_path, "train", max_rows_per_shard=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-00000.safetensors", "val-00000.safetensors"]
    assert len(SequenceShards(tmp_path, "train")) == 1 and len(SequenceShards(tmp_path, "val")) == len(packed)


def test_empty_and_missing_shards(tmp_path):
    empty = pack_by_leaf([], np.zeros((0, 2), np.int64), 8, EOS, PAD, 0)
    info = write_shards(empty, tmp_path, "val")
    assert info[0]["rows"] == 0
    ds = SequenceShards(tmp_path, "val")
    assert len(ds) == 0 and ds.levels == 2 and ds.seq_len == 8
    with pytest.raises(FileNotFoundError, match="no shards named train-00000.safetensors"):
        SequenceShards(tmp_path, "train")
    (tmp_path / "bad-00000.safetensors").write_bytes(b"garbage")
    with pytest.raises(Exception):
        SequenceShards(tmp_path, "bad")

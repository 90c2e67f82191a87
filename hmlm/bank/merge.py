"""Per-rank bank files of a subtree-parallel run, and their merge into one full bank.

Each rank of a `trainer.data_parallel=subtree` run holds only its blocks (docs/distributed.md). At the end of training
it writes them to `<out_dir>/ranks/rank-RRR/bank/<key>.safetensors`: `blocks`, the held rows (one row per block, the
store's row layout), plus `_rows`, their global node ids. `merge_rank_banks` puts the rows back into a full store,
which the ordinary model directory (hmlm.export) then saves: the merged model is indistinguishable from a
single-process one. The same merge serves the paper's "train each subtree as an independent job, then merge".
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..utils import atomic_dir, write_json
from .stores import BlockStore

ROWS = "_rows"
BLOCKS = "blocks"


class BankMergeError(ValueError):
    pass


def save_rank_bank(store: BlockStore, directory: Path, *, rank: int, world: int, info: dict | None = None) -> Path:
    """Write this rank's held blocks (all rows when the store is not restricted) and `rank.json`."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        (tmp / "bank").mkdir()
        for key in store.keys():
            rows = store.held.get(key, torch.arange(store.nodes(key)))
            out = {BLOCKS: store.read_rows(key).params.detach().cpu().contiguous(),
                   ROWS: rows.cpu().to(torch.int64).contiguous()}
            save_file(out, str(tmp / "bank" / f"{key}.safetensors"),
                      metadata={"key": key, "rank": str(rank), "world": str(world), "dtype": str(store.dtype)})
        write_json(tmp / "rank.json", {"rank": rank, "world": world, **(info or {})})
    return directory


def merge_rank_banks(rank_dirs: Sequence[Path], store: BlockStore) -> BlockStore:
    """Fill the full (unrestricted) `store` from the rank directories of one run, in place; returns it.

    Every block must be held by at least one rank; a block held by several ranks (a shared shallow block, or the
    generic block) must be bit-identical across them, since their owner group applied identical updates.
    """
    if store.held:
        raise BankMergeError("merge into a full store, not one restricted to a rank's blocks")
    dirs = [Path(d) for d in rank_dirs]
    metas = []
    for d in dirs:
        meta_path = d / "rank.json"
        if not meta_path.is_file():
            raise BankMergeError(f"{d}: not a rank directory (no rank.json); expected <out_dir>/ranks/rank-RRR")
        metas.append(json.loads(meta_path.read_text(encoding="utf-8")))
    worlds = {m["world"] for m in metas}
    ranks = sorted(m["rank"] for m in metas)
    if len(worlds) != 1 or ranks != list(range(next(iter(worlds)))):
        raise BankMergeError(f"rank directories {', '.join(map(str, dirs))} are not ranks 0..world-1 of one run "
                             f"(ranks {ranks}, world sizes {sorted(worlds)})")
    for key in store.keys():
        nodes, fmt = store.nodes(key), store.format_of(key)
        merged = torch.zeros((nodes, fmt.numel), dtype=fmt.dtype)
        filled = torch.zeros(nodes, dtype=torch.bool)
        for d in dirs:
            path = d / "bank" / f"{key}.safetensors"
            if not path.is_file():
                raise BankMergeError(f"{path}: missing (every rank writes one file per bank key)")
            with safe_open(str(path), framework="pt") as h:
                if BLOCKS not in h.keys():
                    raise BankMergeError(f"{path}: tensor `{BLOCKS}` missing")
                rows = h.get_tensor(ROWS)
                if len(rows) and (rows.min() < 0 or rows.max() >= nodes):
                    raise BankMergeError(f"{path}: rows outside [0, {nodes}) (a bank of another shape)")
                src = h.get_tensor(BLOCKS).to(fmt.dtype)
                if tuple(src.shape) != (len(rows), fmt.numel):
                    raise BankMergeError(f"{path}: `{BLOCKS}` has shape {tuple(src.shape)}, expected "
                                         f"{(len(rows), fmt.numel)}")
                again = filled[rows]
                if again.any() and not torch.equal(merged[rows[again]], src[again]):
                    raise BankMergeError(f"{path}: shared blocks of `{key}` differ from another rank's copy; the "
                                         "rank directories come from different runs or steps")
                merged[rows] = src
            filled[rows] = True
        if not filled.all():
            missing = (~filled).nonzero().squeeze(1)[:5].tolist()
            raise BankMergeError(f"bank key `{key}`: blocks {missing}... are held by no rank directory given")
        store.write_rows(key, torch.arange(nodes), merged)
    return store


def rank_dirs(out_dir: Path) -> list[Path]:
    """The rank directories of a run, in rank order."""
    return sorted(p for p in (Path(out_dir) / "ranks").glob("rank-*") if p.is_dir())

"""Held-out perplexity of a model directory with fetched, generic and no memory.

Each held-out sequence is routed by the tree path stored in the index (the documents' own retrieval key: the full
document, paper-notes §5.2), so "fetched" measures what the memory adds for the data it belongs to.

`leaf_nll` is the one pass over the held-out sequences that both the overall number (`heldout_perplexity`, which
`hmlm fit` prints) and the per-leaf report (hmlm.eval.leafppl) use: every batch is read once and run once per memory
mode through the loss's fused head and chunked log-softmax (hmlm.loss.lm_token_nll), summed per row and per leaf.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from rich.progress import Progress
from torch.utils.data import DataLoader

from ..data.packing import SequenceShards
from ..generate import autocast_for
from ..loss import IGNORE_INDEX, lm_token_nll
from ..model import MEMORY_MODES


def available_modes(loaded) -> list[str]:
    store = loaded.model.store
    if store is None:
        return ["none"]
    return [m for m in MEMORY_MODES if m != "generic" or store.has_generic]


@torch.no_grad()
def leaf_nll(loaded, index_dir: Path, *, modes: Sequence[str], batch_size: int = 16, split: str = "val",
             progress: bool = False, doc_mask: bool | None = None) -> tuple[dict[int, int], dict[str, dict[int, float]]]:
    """(tokens per leaf, {mode: summed NLL per leaf}) over the index's `split` sequences, one read of the data for
    all modes (bf16 autocast on CUDA as training ran, exact float32 on the CPU)."""
    data = SequenceShards(Path(index_dir) / "shards", split)
    if len(data) == 0:
        raise ValueError(f"{index_dir}: the `{split}` split holds no sequences")
    use_doc_ids = loaded.recipe.data.doc_mask if doc_mask is None else doc_mask
    device = loaded.device
    model = loaded.model
    nll: dict[str, dict[int, float]] = {m: {} for m in modes}
    count: dict[int, int] = {}
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("held-out perplexity", total=len(loader))
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["labels"]
            leaves = batch["path"][:, -1].tolist()
            for leaf, n in zip(leaves, (labels != IGNORE_INDEX).sum(1).tolist()):
                count[leaf] = count.get(leaf, 0) + n
            for mode in modes:
                with autocast_for(device):
                    rows = lm_token_nll(model.anchor, batch["input_ids"], labels,
                                        memory=model.memory_context(batch["path"], mode),
                                        doc_ids=batch["doc_ids"] if use_doc_ids else None).sum(1).tolist()
                per_leaf = nll[mode]
                for leaf, value in zip(leaves, rows):
                    per_leaf[leaf] = per_leaf.get(leaf, 0.0) + value
            bar.advance(task)
    return count, nll


def heldout_perplexity(loaded, index_dir: Path, *, batch_size: int = 16, modes: Sequence[str] | None = None,
                       split: str = "val", progress: bool = False, doc_mask: bool | None = None) -> dict[str, float]:
    modes = list(modes or available_modes(loaded))
    count, nll = leaf_nll(loaded, index_dir, modes=modes, batch_size=batch_size, split=split, progress=progress,
                          doc_mask=doc_mask)
    total = max(sum(count.values()), 1)
    return {m: math.exp(sum(nll[m].values()) / total) for m in modes}

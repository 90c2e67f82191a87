"""Held-out perplexity of a model directory with fetched, generic and no memory.

Each held-out sequence is routed by the tree path stored in the index (the documents' own retrieval key: the full
document, paper-notes §5.2), so "fetched" measures what the memory adds for the data it belongs to.

`leaf_nll` is the one pass over the held-out sequences that both the overall number (`perplexities` of its sums, which
`hmlm fit` prints and keeps in the model directory: hmlm.eval.heldout_record; `heldout_perplexity` in one call) and the
per-leaf report (hmlm.eval.leafppl) use: every batch is read once and run once per memory
mode through the loss's fused head and chunked log-softmax (hmlm.loss.lm_token_nll), summed per row and per leaf.
Only the positions up to each sequence's last scored label are run (trailing padding is cut, see `scored_widths`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from rich.progress import Progress

from ..data.packing import SequenceShards
from ..generate import autocast_for
from ..loss import IGNORE_INDEX, lm_token_nll
from ..model import MEMORY_MODES


def available_modes(loaded) -> list[str]:
    store = loaded.model.store
    if store is None:
        return ["none"]
    return [m for m in MEMORY_MODES if m != "generic" or store.has_generic]


def scored_widths(data: SequenceShards) -> list[int]:
    """Per sequence, the input positions up to its last scored label (at least 1). Padding only ends a leaf's last
    sequence (hmlm.data.packing), so the positions after it change no scored position's result under causal
    attention: leaving them out is the same measurement with less work (57% of the quickstart's positions)."""
    widths = []
    for i in range(len(data)):
        scored = np.flatnonzero(data.row(i)[1][1:] >= 0)   # labels = tokens[1:], padding where doc_ids < 0
        widths.append(int(scored[-1]) + 1 if len(scored) else 1)
    return widths


@torch.no_grad()
def leaf_nll(loaded, index_dir: Path, *, modes: Sequence[str], batch_size: int = 16, split: str = "val",
             progress: bool = False, doc_mask: bool | None = None) -> tuple[dict[int, int], dict[str, dict[int, float]]]:
    """(tokens per leaf, {mode: summed NLL per leaf}) over the index's `split` sequences, one read of the data for
    all modes (bf16 autocast on CUDA as training ran, exact float32 on the CPU). Batches hold sequences of similar
    scored width (`scored_widths`), cut to their longest; the sums run in the sequences' stored order."""
    data = SequenceShards(Path(index_dir) / "shards", split)
    if len(data) == 0:
        raise ValueError(f"{index_dir}: the `{split}` split holds no sequences")
    use_doc_ids = loaded.recipe.data.doc_mask if doc_mask is None else doc_mask
    device = loaded.device
    model = loaded.model
    widths = scored_widths(data)
    order = sorted(range(len(data)), key=lambda i: (-widths[i], i))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    row_nll: dict[str, list[float]] = {m: [0.0] * len(data) for m in modes}
    leaves, tokens = [0] * len(data), [0] * len(data)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("held-out perplexity", total=len(batches))
        for idx in batches:
            width = widths[idx[0]]
            items = [data[i] for i in idx]
            batch = {k: torch.stack([it[k][:width] if k != "path" else it[k] for it in items]).to(device)
                     for k in items[0]}
            labels = batch["labels"]
            for row, (i, n) in enumerate(zip(idx, (labels != IGNORE_INDEX).sum(1).tolist())):
                leaves[i], tokens[i] = int(batch["path"][row, -1]), n
            for mode in modes:
                with autocast_for(device):
                    rows = lm_token_nll(model.anchor, batch["input_ids"], labels,
                                        memory=model.memory_context(batch["path"], mode),
                                        doc_ids=batch["doc_ids"] if use_doc_ids else None).sum(1).tolist()
                for i, value in zip(idx, rows):
                    row_nll[mode][i] = value
            bar.advance(task)
    count: dict[int, int] = {}
    for leaf, n in zip(leaves, tokens):
        count[leaf] = count.get(leaf, 0) + n
    nll: dict[str, dict[int, float]] = {m: {} for m in modes}
    for mode in modes:
        per_leaf = nll[mode]
        for leaf, value in zip(leaves, row_nll[mode]):
            per_leaf[leaf] = per_leaf.get(leaf, 0.0) + value
    return count, nll


def perplexities(count: dict[int, int], nll: dict[str, dict[int, float]]) -> dict[str, float]:
    """{mode: perplexity} over all leaves from leaf_nll's (tokens per leaf, {mode: summed NLL per leaf})."""
    total = max(sum(count.values()), 1)
    return {m: math.exp(sum(per_leaf.values()) / total) for m, per_leaf in nll.items()}


def heldout_perplexity(loaded, index_dir: Path, *, batch_size: int = 16, modes: Sequence[str] | None = None,
                       split: str = "val", progress: bool = False, doc_mask: bool | None = None) -> dict[str, float]:
    modes = list(modes or available_modes(loaded))
    count, nll = leaf_nll(loaded, index_dir, modes=modes, batch_size=batch_size, split=split, progress=progress,
                          doc_mask=doc_mask)
    return perplexities(count, nll)

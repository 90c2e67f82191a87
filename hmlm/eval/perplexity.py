"""Held-out perplexity of a model directory with fetched, generic and no memory.

Each held-out sequence is routed by the tree path stored in the index (the documents' own retrieval key: the full
document, paper-notes §5.2), so "fetched" measures what the memory adds for the data it belongs to.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Sequence

import torch
from rich.progress import Progress
from torch.utils.data import DataLoader

from ..data.packing import SequenceShards
from ..loss import lm_nll
from ..model import MEMORY_MODES


def available_modes(loaded) -> list[str]:
    store = loaded.model.store
    if store is None:
        return ["none"]
    return [m for m in MEMORY_MODES if m != "generic" or store.has_generic]


@torch.no_grad()
def heldout_perplexity(loaded, index_dir: Path, *, batch_size: int = 16, modes: Sequence[str] | None = None,
                       split: str = "val", progress: bool = False, doc_mask: bool | None = None) -> dict[str, float]:
    modes = list(modes or available_modes(loaded))
    data = SequenceShards(Path(index_dir) / "shards", split)
    if len(data) == 0:
        raise ValueError(f"{index_dir}: the `{split}` split holds no sequences")
    use_doc_ids = loaded.recipe.data.doc_mask if doc_mask is None else doc_mask
    device = loaded.device
    nll = {m: 0.0 for m in modes}
    count = 0
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("held-out perplexity", total=len(loader))
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["labels"]
            n = int((labels != -100).sum())
            for mode in modes:
                with autocast:   # the training loss's fused head + chunked cross-entropy (hmlm.loss), summed
                    loss = lm_nll(loaded.model.anchor, batch["input_ids"], labels, (labels != -100).float(),
                                  memory=loaded.model.memory_context(batch["path"], mode),
                                  doc_ids=batch["doc_ids"] if use_doc_ids else None)
                nll[mode] += float(loss)
            count += n
            bar.advance(task)
    return {m: math.exp(nll[m] / max(count, 1)) for m in modes}


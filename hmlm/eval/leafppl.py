"""Held-out perplexity per leaf node, against how much training text the leaf received.

Each held-out sequence is packed within one leaf and carries that leaf's path (the documents' own retrieval key,
the full document), so its loss tells how well the memory on that path serves new text from the same cluster.
Leaves are binned by the training tokens routed to them (node_stats.safetensors) in decades: bin "1k-10k" holds
leaves with 1,000 <= tokens < 10,000.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors.numpy import load_file

from ..data.packing import SequenceShards
from .perplexity import leaf_nll, perplexities


def _human(n: int) -> str:
    for unit, div in (("M", 10**6), ("k", 10**3)):
        if n >= div:
            return f"{n // div}{unit}"
    return str(n)


def decade_bin(tokens: int) -> str:
    if tokens <= 0:
        return "0"
    lo = 10 ** int(math.floor(math.log10(tokens)))
    return f"{_human(lo)}-{_human(lo * 10)}"   # [lo, 10 lo)


def perplexity_by_leaf(loaded, index_dir: Path, *, modes: Sequence[str], batch_size: int = 16,
                       split: str = "val", progress: bool = False) -> dict:
    """{"overall": {mode: ppl}, "tokens": n, "bins": [{"bin", "train_tokens_min", "leaves", "tokens", "ppl": {mode}}],
    "leaves": [{"leaf", "train_tokens", "tokens", "ppl": {mode}}]} over the index's `split` sequences."""
    count, nll = leaf_nll(loaded, Path(index_dir), modes=modes, batch_size=batch_size, split=split, progress=progress)
    return leaf_perplexity(Path(index_dir), count, nll, split=split)


def leaf_perplexity(index_dir: Path, count: dict[int, int], nll: dict[str, dict[int, float]], *,
                    split: str = "val") -> dict:
    """perplexity_by_leaf's report from leaf_nll's (tokens per leaf, {mode: summed NLL per leaf}); `hmlm eval` runs
    leaf_nll once per mode (on its second thread) and merges the modes' NLLs before this."""
    modes = list(nll)
    levels = SequenceShards(index_dir / "shards", split).levels
    train_tokens = load_file(str(index_dir / "node_stats.safetensors"))[f"level{levels}_tokens"]
    total = max(sum(count.values()), 1)

    def ppl(mode: str, leaves: list[int]) -> float:
        n = sum(count[leaf] for leaf in leaves)
        return math.exp(sum(nll[mode][leaf] for leaf in leaves) / max(n, 1))

    leaf_rows = [{"leaf": leaf, "train_tokens": int(train_tokens[leaf]), "tokens": count[leaf],
                  "ppl": {m: ppl(m, [leaf]) for m in modes}} for leaf in sorted(count)]
    bins: dict[str, list[int]] = {}
    for row in sorted(leaf_rows, key=lambda r: r["train_tokens"]):
        bins.setdefault(decade_bin(row["train_tokens"]), []).append(row["leaf"])
    bin_rows = [{"bin": label, "train_tokens_min": int(np.min([train_tokens[x] for x in leaves])),
                 "leaves": len(leaves), "tokens": sum(count[x] for x in leaves),
                 "ppl": {m: ppl(m, leaves) for m in modes}} for label, leaves in bins.items()]
    return {"split": split, "tokens": total, "overall": perplexities(count, nll), "bins": bin_rows, "leaves": leaf_rows}

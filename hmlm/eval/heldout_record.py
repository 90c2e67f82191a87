"""The held-out measurement `hmlm fit` ends with, kept in the model directory so that `hmlm eval` need not repeat it.

fit's last step measures the held-out NLL per leaf and memory mode (`leaf_nll`) of the model it has just exported and
writes it to `heldout_nll.json` beside model.json, with the key of that measurement: everything its numbers are a
function of. That is the checksums of the weights and of the held-out shards (as model.json records them), the
device type (bf16 autocast on CUDA, float32 on the CPU), the batch size, the document mask, the torch and hmlm
versions and this module's VERSION (bumped whenever leaf_nll's arithmetic changes).

`hmlm eval` builds the key of the measurement it would make and takes the record only when the two keys are equal, so
the numbers it reports are the ones it would have computed, digit for digit; the report says where they came from,
and `hmlm eval --recompute-perplexity` measures again. A model loaded without verifying its files against model.json
(`--no-verify`) never uses the record: its checksums would vouch for files nobody read.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

RECORD_FILE = "heldout_nll.json"
VERSION = 1


def measurement_key(meta: dict[str, Any], *, device: Any, batch_size: int, doc_mask: bool) -> dict[str, Any]:
    """What a held-out measurement of the model directory described by `meta` (its model.json) depends on."""
    import torch

    from .. import __version__

    checksums = meta.get("checksums") or {}
    files = {name: digest for name, digest in checksums.items()
             if name == "anchor.safetensors" or name.startswith("shards/")}
    bank = {name: entry.get("frame_sha256") for name, entry in (meta.get("bank_files") or {}).items()}
    return {"version": VERSION, "files": files, "bank": bank, "device": torch.device(device).type,
            "batch_size": int(batch_size), "doc_mask": bool(doc_mask), "torch": torch.__version__,
            "hmlm": __version__}


def write_record(model_dir: Path, key: dict[str, Any], count: dict[int, int],
                 nll: dict[str, dict[int, float]]) -> None:
    """Store leaf_nll's result under its key (JSON floats round-trip exactly)."""
    import time

    from ..utils import write_json

    write_json(Path(model_dir) / RECORD_FILE, {
        "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "count": {str(leaf): n for leaf, n in count.items()},
        "nll": {mode: {str(leaf): v for leaf, v in per_leaf.items()} for mode, per_leaf in nll.items()}})


def read_record(model_dir: Path, key: dict[str, Any], modes: Sequence[str]
                ) -> tuple[dict[int, int], dict[str, dict[int, float]], str] | None:
    """(tokens per leaf, {mode: NLL per leaf}, when it was recorded) of `modes` when the directory holds a record
    under exactly `key` with every one of them; None otherwise (no record, another key, a damaged file)."""
    import json

    path = Path(model_dir) / RECORD_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("key") != key or not all(m in record["nll"] for m in modes):
            return None
        count = {int(leaf): int(n) for leaf, n in record["count"].items()}
        nll = {m: {int(leaf): float(v) for leaf, v in record["nll"][m].items()} for m in modes}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None   # a record that cannot be read is no record: the measurement runs
    if any(set(per_leaf) != set(count) or not all(map(math.isfinite, per_leaf.values())) for per_leaf in nll.values()):
        return None
    return count, nll, str(record.get("created", "?"))

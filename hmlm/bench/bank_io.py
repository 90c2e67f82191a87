"""`hmlm bench bank-io`: start-up and export costs of a bank per tier plan.

For each plan: drawing the initial values where the levels live (`init`), exporting them as a model directory's bank
files with per-block checksums (`export`), loading those files back with verification (`load`), writing a training
checkpoint of the bank (`checkpoint save`; just after initialisation there is no optimizer state yet, so this is the
values only) and restoring it into a fresh store (`checkpoint load`). Rates are bank bytes (values) per second.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import Recipe
from ..model import build_anchor, build_layout, build_store


def _timed(fn, device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure_bank_io(recipe: Recipe, *, vocab_size: int, tiers: str, workdir: Path,
                    device: torch.device) -> dict[str, Any]:
    spec: Any = tiers.split(",") if "," in tiers else tiers
    work = Path(workdir) / tiers.replace(",", "-")
    shutil.rmtree(work, ignore_errors=True)
    mem = replace(recipe.memory, store="tiered", tiers=spec, disk_dir=str(work / "disk"))
    recipe = replace(recipe, memory=mem, trainer=replace(recipe.trainer, mode="memory"))
    anchor = build_anchor(recipe, vocab_size, device="meta")
    layout = build_layout(recipe, anchor)
    store = build_store(recipe, layout, init=True, training=True)
    row: dict[str, Any] = {"tiers": None, "bank_params": layout.bank_params(), "io_threads": mem.io_threads,
                           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    row["init_s"] = _timed(lambda: store.to_compute(device), device)
    row["tiers"] = ",".join(store.tier_of(f"l{lvl}") for lvl in layout.active_levels)
    nbytes = sum(store.bytes_by_key().values())
    row["bank_bytes"] = nbytes
    files: dict = {}
    row["export_s"] = _timed(lambda: files.update(store.save(work / "model" / "bank")), device)
    loaded = build_store(recipe, layout, init=False, training=False).to_compute(device)
    row["load_s"] = _timed(lambda: loaded.load(work / "model" / "bank", digests=files), device)
    loaded.close()
    manifest: dict = {}
    ckpt = work / "checkpoints" / "bank" / "step-000001"
    row["checkpoint_save_s"] = _timed(lambda: manifest.update(store.save_checkpoint(ckpt, 1)), device)
    store.close()
    resumed = build_store(recipe, layout, init=False, training=True).to_compute(device)
    row["checkpoint_load_s"] = _timed(lambda: resumed.load_checkpoint(ckpt, manifest), device)
    resumed.close()
    for k in ("init", "export", "load", "checkpoint_save", "checkpoint_load"):
        row[f"{k}_s"] = round(row[f"{k}_s"], 3)
        row[f"{k}_gb_per_s"] = round(nbytes / 1e9 / max(row[f"{k}_s"], 1e-9), 2)
    shutil.rmtree(work, ignore_errors=True)
    return row


def run_bank_io(recipe: Recipe, *, vocab_size: int, tiers: list[str], workdir: Path,
                out: Path | None = None) -> list[dict[str, Any]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [measure_bank_io(recipe, vocab_size=vocab_size, tiers=t, workdir=workdir, device=device) for t in tiers]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return rows

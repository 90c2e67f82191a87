"""`hmlm bench train --profile DIR`: where a training step's time goes, from torch.profiler, for the closing notes'
"missed by how much and why".

A few extra steps of an already warmed-up configuration run under the profiler (CPU and, on CUDA, device
activity). Written per row: DIR/<row>.txt -- the step's regions (TrainStep's `hmlm.*` record_function ranges: fetch,
forward+loss, backward, clip, optimizer steps) with host and device milliseconds per step, the device's busy fraction,
and the top kernels by device self time -- and a summary dict that goes into the row's JSON (`profile`).

The device's busy fraction (summed kernel time / wall time) separates the two kinds of overhead: a host-bound step
(launch overhead, syncs, Python) leaves the device idle; a device-bound one is made faster only by fewer or better
kernels.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..utils import write_text

REGION_PREFIX = "hmlm."


def _device_self_us(evt: Any) -> float:
    # torch >= 2.4 names it device time; older releases cuda time
    return float(getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0)) or 0.0)


def _device_total_us(evt: Any) -> float:
    return float(getattr(evt, "device_time_total", getattr(evt, "cuda_time_total", 0.0)) or 0.0)


def safe_name(row: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", row).strip("_")[:120] or "row"


def profile_steps(run_step: Callable[[int], Any], *, steps: int, device: torch.device, out_dir: Path,
                  name: str, top: int = 25) -> dict[str, Any]:
    """Run `run_step(i)` for i in range(steps) under torch.profiler; write DIR/<name>.txt; return the summary."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    cuda = device.type == "cuda"
    if cuda:
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with profile(activities=activities, record_shapes=False) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            run_step(i)
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = 1000 * (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    regions: dict[str, dict[str, float]] = {}
    kernel_us = 0.0
    host_keys = {evt.key for evt in events if evt.device_type == torch.autograd.DeviceType.CPU}
    for evt in events:
        if evt.key.startswith(REGION_PREFIX):
            slot = regions.setdefault(evt.key, {"host_ms": 0.0, "device_ms": 0.0})
            # a region shows up as a CPU range and, on CUDA, as a device-side annotation of the same name
            slot["host_ms"] = max(slot["host_ms"], evt.cpu_time_total / 1000 / steps)
            slot["device_ms"] = max(slot["device_ms"], _device_total_us(evt) / 1000 / steps)
        elif evt.device_type == torch.autograd.DeviceType.CUDA and evt.key not in host_keys:
            # kernels, memcpy and memset on the device (CPU ops' attributed device time would count them twice; a
            # record_function range such as DDP's "DistributedDataParallel.forward" shows up on the device too, as an
            # annotation spanning its kernels, under the name of its host range: not a kernel of its own)
            kernel_us += _device_self_us(evt)
    device_ms = kernel_us / 1000 / steps if cuda else None
    summary: dict[str, Any] = {
        "steps": steps, "wall_ms_per_step": round(wall_ms, 2),
        "device_busy_ms_per_step": round(device_ms, 2) if device_ms is not None else None,
        "device_busy_fraction": round(device_ms / wall_ms, 3) if device_ms is not None and wall_ms > 0 else None,
        "regions": {k: {m: round(v, 2) for m, v in slot.items()} for k, slot in sorted(regions.items())},
    }
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    lines = [f"profile of {name}: {steps} steps, {wall_ms:.2f} ms per step (wall)"]
    if device_ms is not None:
        lines.append(f"device busy {device_ms:.2f} ms per step ({summary['device_busy_fraction']:.1%} of wall)")
    lines.append("")
    lines.append(f"{'region':<28}{'host ms/step':>14}{'device ms/step':>16}")
    for key, slot in summary["regions"].items():
        lines.append(f"{key:<28}{slot['host_ms']:>14.2f}{slot['device_ms']:>16.2f}")
    lines.append("")
    lines.append(events.table(sort_by=sort_by, row_limit=top, max_name_column_width=70))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{safe_name(name)}.txt"
    write_text(path, "\n".join(lines) + "\n")
    summary["table"] = path.name
    return summary

"""Streaming safetensors files for multi-GB bank levels.

`safetensors.torch.save_file` needs every tensor in host memory at once; a 9 GB level written that way costs a full
copy and a second pass to hash it. `write_streamed` writes the header first and then each tensor's bytes chunk by
chunk as a producer yields them (a background thread writes while the next chunk is gathered), with the data section
starting at a 4 KiB-aligned offset (the header is padded with spaces, which the format allows) so that rows can later
be read with direct I/O. The result is an ordinary safetensors file.
"""
from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..utils import atomic_write_path
from .rows import ALIGN

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64", torch.uint8: "U8", torch.float16: "F16"}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}


class SafetensorsError(ValueError):
    pass


def _bytes_of(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.view(torch.uint8).numpy() if t.dtype != torch.uint8 else t.numpy()).cast("B")


def write_streamed(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...], Callable[[], Iterable]]],
                   metadata: dict[str, str]) -> int:
    """Write a safetensors file; entries: (name, dtype, shape, producer yielding tensors in order). Returns its size."""
    header: dict = {"__metadata__": metadata}
    off = 0
    for name, dtype, shape, _ in entries:
        n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    pad = (-(8 + len(raw))) % ALIGN
    raw += b" " * pad
    path = Path(path)
    with atomic_write_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            q: queue.Queue = queue.Queue(maxsize=4)
            err: list[BaseException] = []

            def writer() -> None:
                while True:
                    item = q.get()
                    if item is None:
                        return
                    if not err:
                        try:
                            f.write(_bytes_of(item))
                        except BaseException as exc:  # noqa: BLE001 - re-raised in the producer's thread
                            err.append(exc)

            th = threading.Thread(target=writer, name="hmlm-bank-writer", daemon=True)
            th.start()
            try:
                for name, dtype, shape, produce in entries:
                    expect = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
                    got = 0
                    for chunk in produce():
                        if err:
                            break
                        got += chunk.numel() * chunk.element_size()
                        q.put(chunk)
                    if not err and got != expect:
                        raise SafetensorsError(f"{path}: tensor {name} produced {got} bytes, expected {expect}")
            finally:
                q.put(None)
                th.join()
            if err:
                raise err[0]
            f.flush()
            os.fsync(f.fileno())
        size = tmp.stat().st_size
    return size


def read_header(path: Path) -> tuple[dict, int]:
    """(header, data start) of a safetensors file; raises SafetensorsError naming the file when it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100 << 20:
                raise SafetensorsError(f"{path}: not a safetensors file (header length {n})")
            raw = f.read(n)
    except FileNotFoundError:
        raise SafetensorsError(f"{path}: missing") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SafetensorsError(f"{path}: corrupt safetensors header") from None
    return header, 8 + n


def tensor_slice(header: dict, name: str, path: Path) -> tuple[torch.dtype, list[int], int, int]:
    entry = header.get(name)
    if not isinstance(entry, dict) or entry.get("dtype") not in TORCH_DTYPES:
        raise SafetensorsError(f"{path}: tensor `{name}` missing")
    a, b = entry["data_offsets"]
    return TORCH_DTYPES[entry["dtype"]], list(entry["shape"]), a, b


def read_tensor(path: Path, header: dict, data_start: int, name: str) -> torch.Tensor:
    """A small tensor of the file (checksums, steps): read directly."""
    dtype, shape, a, b = tensor_slice(header, name, path)
    with open(path, "rb") as f:
        f.seek(data_start + a)
        raw = f.read(b - a)
    if len(raw) != b - a:
        raise SafetensorsError(f"{path}: truncated (tensor `{name}`)")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape).clone()

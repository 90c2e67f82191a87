"""Files of the bank: level files (records at aligned offsets), their metadata snapshots and undo logs.

    <key>.level            a 4 KiB header (magic, JSON: key, nodes, row layout, file id, kind) then one record per
                           node at 4096 + row * stride. The disk tier's working file (kind "working", updated in place)
                           and a checkpoint's copy of an in-memory level (kind "snapshot") share the format.
    <key>.meta.safetensors per-row checksums [N, 2] (params, state), which rows have optimizer state [N], per-row step
                           counts [N], the level file's id; written atomically beside every checkpoint.
    <key>.undo-<step>      the disk tier's copy-on-write log for the epoch that began at checkpoint <step>: before a
                           row is overwritten for the first time after that checkpoint, its record (as of the
                           checkpoint) is appended here and fsynced. Applying the logs newest first restores the file
                           as it was at <step>; each entry is checked against that checkpoint's checksum table, so a
                           torn entry (written while the process died, hence never followed by the in-place write) is
                           skipped.

A file whose header, size or checksums do not match what the checkpoint or model directory expects is refused with a
`BankFileError` that names it.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..utils import atomic_write_path
from .rows import ALIGN, RowFormat

MAGIC = b"HMLMLVL1"
UNDO_MAGIC = b"HMLMUND1"
HEADER = ALIGN


class BankFileError(ValueError):
    """A bank file that is missing, torn, foreign or corrupt; the message names it."""


def new_file_id() -> str:
    return uuid.uuid4().hex


def level_header(key: str, fmt: RowFormat, nodes: int, file_id: str, kind: str) -> bytes:
    meta = json.dumps({"key": key, "nodes": nodes, "layout": fmt.describe(), "file_id": file_id, "kind": kind},
                      sort_keys=True).encode()
    head = MAGIC + len(meta).to_bytes(4, "little") + meta
    if len(head) > HEADER:
        raise ValueError(f"level header of {key} is {len(head)} bytes (> {HEADER})")
    return head + b"\0" * (HEADER - len(head))


def create_level_file(path: Path, key: str, fmt: RowFormat, nodes: int, file_id: str, kind: str) -> None:
    """A level file of `nodes` empty (zero, sparse) records."""
    with open(path, "wb") as f:
        f.write(level_header(key, fmt, nodes, file_id, kind))
        f.truncate(HEADER + nodes * fmt.stride)


def read_level_header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER)
    except FileNotFoundError:
        raise BankFileError(f"{path}: bank level file missing") from None
    if len(head) < 12 or head[:8] != MAGIC:
        raise BankFileError(f"{path}: not an hmlm bank level file (bad magic)")
    n = int.from_bytes(head[8:12], "little")
    try:
        return json.loads(head[12:12 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BankFileError(f"{path}: corrupt level file header") from None


def check_level_file(path: Path, key: str, fmt: RowFormat, nodes: int, file_id: str | None = None) -> dict:
    """The header of `path` if it is a level file of exactly this layout (and this file id); raises otherwise."""
    meta = read_level_header(path)
    want = {"key": key, "nodes": nodes, "layout": json.loads(json.dumps(fmt.describe()))}
    got = {k: meta.get(k) for k in want}
    if got != want:
        raise BankFileError(f"{path}: a level file of another bank (key {meta.get('key')}, {meta.get('nodes')} nodes, "
                            f"layout {meta.get('layout')}); expected key {key}, {nodes} nodes, layout {want['layout']}")
    if file_id is not None and meta.get("file_id") != file_id:
        raise BankFileError(f"{path}: level file id {meta.get('file_id')} is not the one the checkpoint was taken of "
                            f"({file_id}); the file was replaced (another run wrote it)")
    size = path.stat().st_size
    if size < HEADER + nodes * fmt.stride:
        raise BankFileError(f"{path}: truncated ({size} bytes, expected {HEADER + nodes * fmt.stride})")
    return meta


# ---------------------------------------------------------------------------------------------------- metadata
def write_meta(path: Path, *, key: str, file_id: str, checksums: torch.Tensor, state_rows: torch.Tensor,
               steps: torch.Tensor, extra: dict | None = None) -> None:
    tensors = {"checksums": checksums.detach().cpu().to(torch.int64).contiguous(),
               "state_rows": state_rows.detach().cpu().to(torch.uint8).contiguous(),
               "steps": steps.detach().cpu().to(torch.int64).contiguous()}
    meta = {"key": key, "file_id": file_id, **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    with atomic_write_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        _fsync_path(tmp)


def read_meta(path: Path, key: str, nodes: int) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            out = {name: f.get_tensor(name) for name in ("checksums", "state_rows", "steps")}
    except FileNotFoundError:
        raise BankFileError(f"{path}: bank checkpoint metadata missing") from None
    except Exception as exc:  # safetensors raises plain errors on torn files
        raise BankFileError(f"{path}: corrupt bank checkpoint metadata ({exc})") from None
    if meta.get("key") != key or tuple(out["checksums"].shape) != (nodes, 2) or len(out["steps"]) != nodes:
        raise BankFileError(f"{path}: metadata of another bank level (key {meta.get('key')}, "
                            f"{tuple(out['checksums'].shape)} checksums); expected {key} with {nodes} rows")
    out["state_rows"] = out["state_rows"].bool()
    out["file_id"] = meta.get("file_id")
    return out


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        _fsync_path(path)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------------- undo logs
def undo_path(directory: Path, key: str, step: int) -> Path:
    return Path(directory) / f"{key}.undo-{step:09d}"


def undo_epochs(directory: Path, key: str) -> list[int]:
    """Steps of the undo logs present for `key`, ascending."""
    out = []
    for p in Path(directory).glob(f"{key}.undo-*"):
        try:
            out.append(int(p.name.rsplit("-", 1)[1]))
        except ValueError:
            continue
    return sorted(out)


class UndoLog:
    """Append-only pre-images of records; `append` returns once they are durable."""

    def __init__(self, path: Path, stride: int):
        self.path, self.stride = Path(path), stride
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fsync_dir(self.path.parent)

    def append(self, rows: np.ndarray, records: np.ndarray) -> None:
        for row, rec in zip(rows.tolist(), records):
            head = UNDO_MAGIC + int(row).to_bytes(8, "little") + int(self.stride).to_bytes(8, "little")
            os.write(self.fd, head + b"\0" * (ALIGN - len(head)))
            os.write(self.fd, memoryview(np.ascontiguousarray(rec[:self.stride])))
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def read_undo(path: Path, stride: int) -> Iterator[tuple[int, np.ndarray]]:
    """(row, record) entries of an undo log in append order; a torn tail (short entry) ends the iteration."""
    with open(path, "rb") as f:
        while True:
            head = f.read(ALIGN)
            if len(head) < ALIGN or head[:8] != UNDO_MAGIC or int.from_bytes(head[16:24], "little") != stride:
                return
            data = f.read(stride)
            if len(data) < stride:
                return
            yield int.from_bytes(head[8:16], "little"), np.frombuffer(data, dtype=np.uint8)

"""Block I/O of the disk tier: fixed-size records of one file, read and written by row number.

`BlockIO` is the small interface the tier logic uses; a faster backend (e.g. DeepSpeed's async I/O op) plugs in by
implementing it and being passed to the store (`TieredStore(..., io_factory=...)`); `memory.disk_io` picks between this
module's thread pool and DeepSpeed's async I/O (hmlm/bank/aio.py):

    read_rows(rows, out, nbytes)    out[i, :nbytes] = the first nbytes of record rows[i]     (out: [U, >= span] uint8)
    write_rows(rows, src, nbytes)   record rows[i] = src[i, :nbytes]
    read_range(row, out) / write_range(row, src)    contiguous records (bulk initialisation, export, checkpoints)
    flush()                          make everything written durable (fsync)
    close()

The default, `ThreadPoolBlockIO`, issues one `os.preadv`/`os.pwritev` per record from a thread pool (they release the
GIL, so records are read in parallel). It opens the file with O_DIRECT when the records are aligned and the file system
accepts it, so reads bypass the page cache and cost what the device costs; otherwise it falls back to buffered I/O and
says so once in the log (records that are not 4 KiB-aligned, e.g. a model directory's bank file whose block size is
not a multiple of 4 KiB, are read through the page cache). Buffers must be 4 KiB-aligned for O_DIRECT
(`aligned_empty` makes such buffers, pinned when CUDA is present).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from .rows import ALIGN, align

log = logging.getLogger("hmlm.bank")
_WARNED: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg)


def aligned_empty(rows: int, stride: int, *, pin: bool = False) -> torch.Tensor:
    """A [rows, stride] uint8 buffer whose start is 4 KiB-aligned (pinned host memory with `pin`)."""
    raw = torch.empty(rows * stride + ALIGN, dtype=torch.uint8, pin_memory=pin)
    off = (-raw.data_ptr()) % ALIGN
    return raw[off:off + rows * stride].view(rows, stride)


class BlockIO(Protocol):
    def read_rows(self, rows: Sequence[int], out: torch.Tensor, nbytes: int) -> None: ...

    def write_rows(self, rows: Sequence[int], src: torch.Tensor, nbytes: int) -> None: ...

    def read_range(self, row: int, out: torch.Tensor) -> None: ...

    def write_range(self, row: int, src: torch.Tensor) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


BlockIOFactory = Callable[..., BlockIO]


class ThreadPoolBlockIO:
    """Records of `stride` bytes starting at byte `base` of `path`, through os.preadv/pwritev in a thread pool."""

    backend = "threads"

    def __init__(self, path: str | Path, *, base: int, stride: int, writable: bool = True, threads: int = 8,
                 direct: bool = True):
        self.path, self.base, self.stride = Path(path), base, stride
        flags = os.O_RDWR if writable else os.O_RDONLY
        self.fd = os.open(self.path, flags)
        self.dfd: int | None = None
        if direct and hasattr(os, "O_DIRECT") and base % ALIGN == 0 and stride % ALIGN == 0:
            try:
                self.dfd = os.open(self.path, flags | os.O_DIRECT)
            except OSError as exc:
                _warn_once("odirect-open", f"bank disk tier: O_DIRECT not available for {self.path} ({exc}); "
                                           "using buffered I/O through the page cache")
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="hmlm-blockio")

    @property
    def direct(self) -> bool:
        return self.dfd is not None

    # ------------------------------------------------------------------ one record per call
    def _fd_for(self, buf: np.ndarray, offset: int, nbytes: int) -> int:
        if self.dfd is not None and buf.ctypes.data % ALIGN == 0 and offset % ALIGN == 0 and nbytes % ALIGN == 0:
            return self.dfd
        return self.fd

    def _transfer(self, buf: np.ndarray, offset: int, write: bool) -> None:
        """All of buf from/to the file at offset: O_DIRECT while aligned, else (or after a failure) the page cache."""
        n, done = buf.nbytes, 0
        op = os.pwritev if write else os.preadv
        while done < n:
            fd = self._fd_for(buf[done:], offset + done, n - done)
            try:
                got = op(fd, [memoryview(buf[done:])], offset + done)
            except OSError as exc:
                if fd != self.dfd:
                    raise
                _warn_once("odirect-io", f"bank disk tier: O_DIRECT {'write to' if write else 'read of'} {self.path} "
                                         f"failed ({exc}); falling back to buffered I/O")
                os.close(self.dfd)
                self.dfd = None
                continue
            if got == 0 and not write:  # past the end of a sparse file: zeros
                buf[done:] = 0
                return
            if got == 0:
                raise OSError(f"{self.path}: no progress writing at offset {offset + done}")
            done += got

    def _pread(self, buf: np.ndarray, offset: int) -> None:
        self._transfer(buf, offset, write=False)

    def _pwrite(self, buf: np.ndarray, offset: int) -> None:
        self._transfer(buf, offset, write=True)

    def _span(self, nbytes: int, out: torch.Tensor) -> int:
        span = min(align(nbytes, ALIGN), out.shape[1]) if self.dfd is not None else nbytes
        return max(span, nbytes)

    def read_rows(self, rows: Sequence[int], out: torch.Tensor, nbytes: int) -> None:
        arr = out.numpy()
        span = self._span(nbytes, out)
        list(self.pool.map(lambda i_r: self._pread(arr[i_r[0], :span], self.base + i_r[1] * self.stride),
                           enumerate(int(r) for r in rows)))

    def write_rows(self, rows: Sequence[int], src: torch.Tensor, nbytes: int) -> None:
        arr = src.numpy()
        span = self._span(nbytes, src)
        list(self.pool.map(lambda i_r: self._pwrite(arr[i_r[0], :span], self.base + i_r[1] * self.stride),
                           enumerate(int(r) for r in rows)))

    # ------------------------------------------------------------------ contiguous ranges
    def _chunks(self, row: int, buf: torch.Tensor, per: int = 16 << 20) -> list[tuple[np.ndarray, int]]:
        flat = buf.numpy().reshape(-1)
        step = max(self.stride, per // self.stride * self.stride)
        return [(flat[a:a + step], self.base + row * self.stride + a) for a in range(0, flat.nbytes, step)]

    def read_range(self, row: int, out: torch.Tensor) -> None:
        list(self.pool.map(lambda c: self._pread(*c), self._chunks(row, out)))

    def write_range(self, row: int, src: torch.Tensor) -> None:
        list(self.pool.map(lambda c: self._pwrite(*c), self._chunks(row, src)))

    def drop_cache(self) -> None:
        """Evict this file's clean pages from the page cache (cold-read measurements with buffered I/O)."""
        os.fsync(self.fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for fd in (self.fd, self.dfd):
            if fd is not None:
                os.close(fd)
        self.dfd = None

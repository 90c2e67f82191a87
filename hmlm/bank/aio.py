"""The disk tier's block I/O through DeepSpeed's async I/O op (libaio, O_DIRECT): `AIOBlockIO`, and the choice
between it and the thread pool (`memory.disk_io: auto | aio | threads`, `block_io_factory`).

A read or write of U records becomes U requests spread over `threads` DeepSpeed `aio_handle`s (one worker thread
each, `intra_op_parallelism=1`): each handle submits a record as blocks of `BLOCK_BYTES` to the kernel, up to
`QUEUE_DEPTH` at a time, and `wait()` collects them. Requests go to the kernel only when they are direct-I/O aligned
(buffer address, file offset and length multiples of 4 KiB, within the file's size); anything else -- a model
directory's bank file whose rows are not 4 KiB multiples, a file system without O_DIRECT -- takes the thread pool's
path (`ThreadPoolBlockIO`), which also does fsync and cache drops. DeepSpeed's handle copies through a bounce buffer
when a buffer is not page-locked; the disk tier's staging buffers are pinned on CUDA, so on a GPU no copy is made.

DeepSpeed's handle does not report the status of single requests (a failed request leaves the buffer as it was);
the disk tier verifies each row's checksum on every read, so a failed read or an earlier failed write is refused there
with the file and rows named, as any torn record is.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Sequence

import torch

from .blockio import BlockIOFactory, ThreadPoolBlockIO, _warn_once
from .dsops import OpUnavailable, load_op
from .rows import ALIGN, align

DISK_IO = ("auto", "aio", "threads")
BLOCK_BYTES = 256 << 10
QUEUE_DEPTH = 32


class AIOBlockIO:
    """Records of `stride` bytes at byte `base` of `path`, read and written through DeepSpeed's aio handles."""

    backend = "aio"

    def __init__(self, path: str | Path, *, base: int, stride: int, writable: bool = True, threads: int = 8,
                 op=None):
        self.path, self.base, self.stride = Path(path), base, stride
        self.fallback = ThreadPoolBlockIO(path, base=base, stride=stride, writable=writable, threads=threads)
        op = op or load_op("async_io")
        self.handles = [op.aio_handle(BLOCK_BYTES, QUEUE_DEPTH, False, True, 1) for _ in range(max(1, threads))]
        self.name = str(self.path)
        self.lock = threading.Lock()   # a handle's wait() collects every request queued on it: one batch at a time
        self.requests = 0              # requests the kernel served (tests check the op was used)

    @property
    def direct(self) -> bool:
        return self.fallback.direct

    def _aligned(self, items: Sequence[tuple[torch.Tensor, int]], size: int) -> bool:
        return self.direct and all(buf.data_ptr() % ALIGN == 0 and off % ALIGN == 0 and buf.nbytes % ALIGN == 0
                                   and buf.is_contiguous() and off + buf.nbytes <= size for buf, off in items)

    def _submit(self, items: list[tuple[torch.Tensor, int]], write: bool) -> bool:
        """Queue every (buffer, file offset) on the handles and wait; False (nothing done) when a request is not
        direct-I/O aligned, so the caller takes the thread pool's path."""
        if not items:
            return True
        # a write may extend the file; a read past its end would trip an assertion in DeepSpeed's handle
        size = float("inf") if write else os.fstat(self.fallback.fd).st_size
        if not self._aligned(items, size):
            return False
        if not items[0][0].is_pinned():
            _warn_once("aio-bounce", "bank disk tier: staging buffers are not page-locked (no CUDA); DeepSpeed's "
                                     "async I/O copies each request through a bounce buffer")
        with self.lock:
            used = set()
            for i, (buf, off) in enumerate(items):
                h = i % len(self.handles)
                op = self.handles[h].async_pwrite if write else self.handles[h].async_pread
                if op(buf, self.name, off) != 0:
                    for j in used:   # leave no request queued behind an error
                        self.handles[j].wait()
                    raise OSError(f"{self.path}: DeepSpeed async {'write' if write else 'read'} of {buf.nbytes} "
                                  f"bytes at offset {off} could not be queued (see the message above)")
                used.add(h)
            for h in used:
                self.handles[h].wait()
            self.requests += len(items)
        return True

    def _rows(self, rows: Sequence[int], buf: torch.Tensor, nbytes: int) -> list[tuple[torch.Tensor, int]]:
        span = max(min(align(nbytes, ALIGN), buf.shape[1]), nbytes)
        return [(buf[i, :span], self.base + int(r) * self.stride) for i, r in enumerate(rows)]

    def read_rows(self, rows: Sequence[int], out: torch.Tensor, nbytes: int) -> None:
        if not self._submit(self._rows(rows, out, nbytes), write=False):
            self.fallback.read_rows(rows, out, nbytes)

    def write_rows(self, rows: Sequence[int], src: torch.Tensor, nbytes: int) -> None:
        if not self._submit(self._rows(rows, src, nbytes), write=True):
            self.fallback.write_rows(rows, src, nbytes)

    def _range(self, row: int, buf: torch.Tensor, per: int = 16 << 20) -> list[tuple[torch.Tensor, int]]:
        flat = buf.reshape(-1)
        step = max(self.stride, per // self.stride * self.stride)
        return [(flat[a:a + step], self.base + row * self.stride + a) for a in range(0, flat.nbytes, step)]

    def read_range(self, row: int, out: torch.Tensor) -> None:
        if not (out.is_contiguous() and self._submit(self._range(row, out), write=False)):
            self.fallback.read_range(row, out)

    def write_range(self, row: int, src: torch.Tensor) -> None:
        if not (src.is_contiguous() and self._submit(self._range(row, src), write=True)):
            self.fallback.write_range(row, src)

    def drop_cache(self) -> None:
        self.fallback.drop_cache()

    def flush(self) -> None:
        self.fallback.flush()

    def close(self) -> None:
        self.handles = []
        self.fallback.close()


def block_io_factory(disk_io: str) -> BlockIOFactory:
    """The disk tier's BlockIO class for `memory.disk_io`: `threads` (and `auto`) -> ThreadPoolBlockIO; `aio` ->
    AIOBlockIO (an error when DeepSpeed's op cannot be built).

    `auto` is the thread pool because it trained faster: one H100, 160M + 4.6B bank all on disk, batch 8 x 2048
    (docs/benchmarks.md, 2026-11-26): 0.341 of the anchor's tokens/s with threads against 0.282 with DeepSpeed's AIO.
    AIO fetched one memory faster (3.67 against 4.14 ms p50, cold), so `aio` stays the choice for serving."""
    if disk_io not in DISK_IO:
        raise ValueError(f"memory.disk_io: {disk_io!r}; expected one of {', '.join(DISK_IO)}")
    if disk_io in ("threads", "auto"):
        return ThreadPoolBlockIO
    try:
        load_op("async_io")
    except OpUnavailable as exc:
        raise OpUnavailable(f"memory.disk_io=aio: {exc}; use memory.disk_io=threads (or auto) here") from None
    return AIOBlockIO


def io_backend(io: object) -> str:
    return getattr(io, "backend", "threads")

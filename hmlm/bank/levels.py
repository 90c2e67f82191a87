"""One bank level on its tier, and how its rows reach the compute device and come back.

    DeviceLevel      rows and optimizer state in accelerator memory (or CPU memory when training on the CPU);
                     a fetch is one index_select, an update one index_copy_ per tensor.
    PipelinedLevel   rows in host RAM (`TensorStorage` on the CPU) or in a level file (`FileStorage`, disk tier),
                     served to the compute device through staging and written back off the critical path.

The pipeline (PipelinedLevel), per level:
  * `prefetch(rows)` (the rows of a batch the data loader has yielded but the model has not fetched yet) queues a
    stage task on the level's I/O thread: read the rows and their optimizer state into pinned buffers, copy them to
    the device on a side CUDA stream, verify disk reads by checksum there.
  * `store(rows, batch)` after the update queues a write-back task: copy the updated records to pinned memory on the
    side stream, then write them to the host tensors or the level file (copy-on-write of the checkpointed record first).
    The updated rows stay on the device as `recent` until the next update of the level.
  * `fetch(rows)` serves each row from the freshest valid source: `recent`, else a finished stage task, else a
    synchronous read after all queued write-backs have landed.
Tasks of one level run in FIFO order on one thread, and every row has a version (its number of updates issued). A stage
task records the versions at the time it is queued; since every write-back queued before it has landed when it reads,
its data has exactly those versions, and it is used only if the row's version has not moved since. So a fetch never
sees a block whose write-back is pending (tests/test_bank_prefetch.py checks this against a store without prefetch on
random path sequences, bit for bit).

On the CPU (no CUDA) the same tasks run on the same thread, without streams.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .blockio import BlockIO, BlockIOFactory, ThreadPoolBlockIO, aligned_empty
from .levelfile import (HEADER, BankFileError, UndoLog, check_level_file, create_level_file, fsync_dir, new_file_id,
                        read_undo, undo_epochs, undo_path)
from .indexed_adamw import indexed_adamw_
from .optim import AdamHyper
from .rows import RowFormat, checksums_via

MAX_STAGED_TASKS = 4


def to_device(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (row numbers) on `device` without stalling the host: pinned, then copied asynchronously."""
    if device.type != "cuda" or index.device.type != "cpu":
        return index.to(device)
    return index.pin_memory().to(device, non_blocking=True)


def to_device_many(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Several small 1-D CPU tensors of one dtype on `device` with one pinned copy (views of it): a fetch moves half a
    dozen index tensors, and each transfer costs the host more than the bytes do."""
    if not tensors:
        return []
    flat = to_device(torch.cat(tensors), device)
    return list(flat.split([t.numel() for t in tensors]))


@dataclass
class RowBatch:
    """Rows of one level in storage dtypes: params [U, P]; m and v when the optimizer state travels along.

    When `rec` is set the fields are views of that record buffer [U, stride] (rows.RowFormat), which then is what a
    disk write or a checksum covers.
    """

    params: torch.Tensor
    m: torch.Tensor | None = None
    v: torch.Tensor | None = None
    rec: torch.Tensor | None = None

    @staticmethod
    def of_record(fmt: RowFormat, rec: torch.Tensor, with_state: bool) -> "RowBatch":
        if with_state:
            return RowBatch(fmt.params(rec), fmt.m(rec), fmt.v(rec), rec)
        return RowBatch(fmt.params(rec), rec=rec)

    @property
    def has_state(self) -> bool:
        return self.m is not None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.params, self.m, self.v) if t is not None]

    def to(self, fmt: RowFormat, device: torch.device, non_blocking: bool = False) -> "RowBatch":
        if self.rec is not None:
            return RowBatch.of_record(fmt, self.rec.to(device, non_blocking=non_blocking), self.has_state)
        return RowBatch(*(None if t is None else t.to(device, non_blocking=non_blocking)
                          for t in (self.params, self.m, self.v)))


def empty_batch(fmt: RowFormat, n: int, device: torch.device, with_state: bool, *, record: bool = False,
                pin: bool = False) -> RowBatch:
    if record:
        rec = (aligned_empty(n, fmt.stride, pin=pin) if device.type == "cpu"
               else torch.empty((n, fmt.stride), dtype=torch.uint8, device=device))
        if with_state:
            rec[:, fmt.param_bytes:].zero_()   # padding between sections is part of no checksum, but keep it defined
        return RowBatch.of_record(fmt, rec, with_state)
    mk = lambda shape, dt: torch.empty(shape, dtype=dt, device=device, pin_memory=pin)  # noqa: E731
    if not with_state:
        return RowBatch(mk((n, fmt.numel), fmt.dtype))
    return RowBatch(mk((n, fmt.numel), fmt.dtype), mk((n, fmt.numel), fmt.m_dtype), mk((n, fmt.v_numel), fmt.v_dtype))


def pack_records(fmt: RowFormat, batch: RowBatch) -> torch.Tensor:
    """The record buffer [U, stride] of a batch with state (its own when it has one)."""
    if batch.rec is not None and batch.has_state:
        return batch.rec
    out = empty_batch(fmt, batch.params.shape[0], batch.params.device, True, record=True)
    out.params.copy_(batch.params)
    out.m.copy_(batch.m)
    out.v.copy_(batch.v)
    return out.rec


# ---------------------------------------------------------------------------------------------------- storages
class TensorStorage:
    """Rows and optimizer state as tensors on one device (the compute device, or host RAM)."""

    def __init__(self, fmt: RowFormat, nodes: int, device: torch.device, *, dense_state: bool):
        self.fmt, self.nodes, self.device = fmt, nodes, device
        self.params = torch.empty((nodes, fmt.numel), dtype=fmt.dtype, device=device)
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        # host RAM: torch.empty leaves pages uncommitted until written, so a row that is never updated costs no
        # memory (the slot table of a sparse level is the OS's page table); unset rows read as zeros
        self.dense_state = dense_state

    def _alloc_state(self) -> None:
        if self.m is None:
            alloc = torch.zeros if self.dense_state else torch.empty
            self.m = alloc((self.nodes, self.fmt.numel), dtype=self.fmt.m_dtype, device=self.device)
            self.v = alloc((self.nodes, self.fmt.v_numel), dtype=self.fmt.v_dtype, device=self.device)

    def read(self, rows: torch.Tensor, with_state: bool, state_mask: torch.Tensor,
             out: RowBatch | None = None) -> RowBatch:
        idx = to_device(rows, self.device)
        p = torch.index_select(self.params, 0, idx, out=None if out is None else out.params)
        if not with_state:
            return RowBatch(p, rec=None if out is None else out.rec)
        if self.m is None:
            m = out.m.zero_() if out is not None else torch.zeros((len(rows), self.fmt.numel), dtype=self.fmt.m_dtype,
                                                                  device=self.device)
            v = out.v.zero_() if out is not None else torch.zeros((len(rows), self.fmt.v_numel),
                                                                  dtype=self.fmt.v_dtype, device=self.device)
        else:
            m = torch.index_select(self.m, 0, idx, out=None if out is None else out.m)
            v = torch.index_select(self.v, 0, idx, out=None if out is None else out.v)
            if not self.dense_state and not bool(state_mask.all()):
                fresh = (~state_mask).to(self.device)
                m[fresh] = 0
                v[fresh] = 0
        return RowBatch(p, m, v, None if out is None else out.rec)

    def write(self, rows: torch.Tensor, batch: RowBatch) -> None:
        idx = to_device(rows, self.device)
        self.params.index_copy_(0, idx, batch.params.to(self.device))
        if batch.has_state:
            self._alloc_state()
            self.m.index_copy_(0, idx, batch.m.to(self.device))
            self.v.index_copy_(0, idx, batch.v.to(self.device))

    def read_range(self, a: int, b: int, with_state: bool, state_mask: torch.Tensor) -> RowBatch:
        """Rows a..b: views of the storage (no copy) unless never-written state must read as zeros."""
        if not with_state:
            return RowBatch(self.params[a:b])
        if self.m is None or (not self.dense_state and not bool(state_mask[a:b].all())):
            return self.read(torch.arange(a, b), with_state, state_mask[a:b])
        return RowBatch(self.params[a:b], self.m[a:b], self.v[a:b])

    def write_range(self, a: int, batch: RowBatch) -> None:
        b = a + batch.params.shape[0]
        self.params[a:b].copy_(batch.params)
        if batch.has_state:
            self._alloc_state()
            self.m[a:b].copy_(batch.m)
            self.v[a:b].copy_(batch.v)

    def restrict(self, rows: torch.Tensor) -> None:
        idx = rows.to(self.device)
        self.params = self.params.index_select(0, idx)
        if self.m is not None:
            self.m, self.v = self.m.index_select(0, idx), self.v.index_select(0, idx)
        self.nodes = len(rows)

    def state_bytes_committed(self) -> int:
        return 0 if self.m is None else self.m.numel() * self.m.element_size() + self.v.numel() * self.v.element_size()

    def close(self) -> None:
        pass


class FileStorage:
    """The disk tier: one level file of records at 4096 + row * stride, read and written through a BlockIO.

    Keeps each row's checksums (params, state) in memory, updates them with every write and verifies every read.
    After `snapshot(step)` the first write of each row appends its previous record to the undo log of that step.
    """

    def __init__(self, fmt: RowFormat, nodes: int, path: Path, *, key: str, create: bool, threads: int,
                 io_factory: BlockIOFactory | None = None, pin: bool = False, exported: tuple[int, int] | None = None):
        self.fmt, self.nodes, self.path, self.key, self.pin = fmt, nodes, Path(path), key, pin
        self.checksum_device: torch.device | None = None   # an accelerator to sum bulk reads and writes on
        self.writable = exported is None
        factory = io_factory or ThreadPoolBlockIO
        self.checksums = torch.zeros((nodes, 2), dtype=torch.int64)
        self.snapshot_step: int | None = None
        self.dirty = np.zeros(nodes, dtype=bool)
        self.undo: UndoLog | None = None
        self.lock = threading.Lock()
        if exported is not None:
            # a model directory's bank file, read-only: the rows of `blocks` at (data start, P * itemsize)
            base, stride = exported
            self.file_id = None
            self.io: BlockIO = factory(self.path, base=base, stride=stride, writable=False, threads=threads)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if create:
            self.file_id = new_file_id()
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            create_level_file(tmp, key, fmt, nodes, self.file_id, "working")
            tmp.replace(self.path)
            fsync_dir(self.path.parent)
            for step in undo_epochs(self.path.parent, key):  # logs of an older run in this directory
                undo_path(self.path.parent, key, step).unlink()
        else:
            self.file_id = check_level_file(self.path, key, fmt, nodes)["file_id"]
        self.io = factory(self.path, base=HEADER, stride=fmt.stride, writable=True, threads=threads)

    def _buffer(self, n: int, width: int) -> torch.Tensor:
        return aligned_empty(n, width, pin=self.pin)

    def read(self, rows: torch.Tensor, with_state: bool, state_mask: torch.Tensor, out: RowBatch | None = None,
             verify: bool = True) -> RowBatch:
        fmt = self.fmt
        width = fmt.stride if with_state else fmt.param_span
        rec = out.rec if out is not None and out.rec is not None else self._buffer(len(rows), width)
        self.io.read_rows(rows.tolist(), rec, fmt.record_bytes if with_state else fmt.param_bytes)
        if with_state and not bool(state_mask.all()):
            rec[~state_mask, fmt.m_offset:] = 0   # never-written state (a hole of the sparse file) is zero
        if verify:
            self.verify(rows, rec, with_state, state_mask)
        return RowBatch.of_record(fmt, rec, with_state)

    def verify(self, rows: torch.Tensor, rec: torch.Tensor, with_state: bool, state_mask: torch.Tensor) -> None:
        want = self.checksums[rows]
        if with_state:
            bad = (checksums_via(self.checksum_device, self.fmt, rec, state_mask) != want).any(1)
        else:
            bad = checksums_via(self.checksum_device, self.fmt, rec, params_only=True) != want[:, 0]
        if bool(bad.any()):
            raise BankFileError(f"{self.path}: rows {rows[bad][:5].tolist()} fail their checksum (a torn or corrupt "
                                "disk-tier file); resume from the last checkpoint")

    def write(self, rows: torch.Tensor, rec: torch.Tensor, state_mask: torch.Tensor,
              checksums: torch.Tensor | None = None, nbytes: int | None = None) -> None:
        """Write records rec[i] to rows[i] (their first `nbytes`, default the whole record)."""
        fmt = self.fmt
        if checksums is None:
            checksums = checksums_via(self.checksum_device, fmt, rec, state_mask)
        r = rows.numpy()
        with self.lock:
            if self.snapshot_step is not None:
                first = r[~self.dirty[r]]
                if len(first):
                    pre = self._buffer(len(first), fmt.stride)
                    self.io.read_rows(first.tolist(), pre, fmt.stride)
                    if self.undo is None:
                        self.undo = UndoLog(undo_path(self.path.parent, self.key, self.snapshot_step), fmt.stride)
                    self.undo.append(first, pre.numpy())   # durable before the in-place write below
                    self.dirty[first] = True
            self.io.write_rows(r.tolist(), rec, nbytes or fmt.record_bytes)
            self.checksums[rows] = checksums.cpu()

    def read_range(self, a: int, b: int, with_state: bool, state_mask: torch.Tensor, verify: bool = True) -> RowBatch:
        if not self.writable or not with_state:   # only the values: each record's first bytes
            return self.read(torch.arange(a, b), False, state_mask[a:b], verify=verify)
        rec = self._buffer(b - a, self.fmt.stride)
        self.io.read_range(a, rec)
        rows = torch.arange(a, b)
        if with_state and not bool(state_mask[a:b].all()):
            rec[~state_mask[a:b], self.fmt.m_offset:] = 0
        if verify:
            self.verify(rows, rec, with_state, state_mask[a:b])
        return RowBatch.of_record(self.fmt, rec, with_state)

    def write_range(self, a: int, batch: RowBatch, state_mask: torch.Tensor) -> None:
        rows = torch.arange(a, a + batch.params.shape[0])
        if batch.has_state:
            self.write(rows, pack_records(self.fmt, batch), state_mask[a:a + len(rows)])
            return
        mask = state_mask[a:a + len(rows)]
        if bool(mask.any()):
            # rows that have optimizer state: read-modify-write, so that only their values change
            full = self.read(rows, True, mask, verify=False)
            full.params.copy_(batch.params)
            self.write(rows, full.rec, mask)
            return
        rec = self._buffer(len(rows), self.fmt.param_span)
        rec[:, self.fmt.param_bytes:] = 0
        self.fmt.params(rec).copy_(batch.params)
        self.write(rows, rec, mask, nbytes=self.fmt.param_bytes)

    # ------------------------------------------------------------------ crash consistency
    def snapshot(self, step: int) -> None:
        """Everything written so far is durable and is the state at `step`; later first writes go to its undo log."""
        with self.lock:
            self.io.flush()
            if self.undo is not None:
                self.undo.close()
                self.undo = None
            previous = self.snapshot_step
            self.snapshot_step = step
            self.dirty[:] = False
            # keep the logs of the previous checkpoint (its Lightning file may not be written yet) and of this one
            for s in undo_epochs(self.path.parent, self.key):
                if s < (previous if previous is not None else step) or (previous is None and s != step):
                    undo_path(self.path.parent, self.key, s).unlink(missing_ok=True)

    def restore(self, step: int, tables: dict[int, dict]) -> int:
        """Roll the file back to checkpoint `step` by applying the undo logs of epochs >= step, newest first.

        `tables[s]` holds checkpoint s's checksum table and state rows, against which the entries of log s are
        checked (a torn entry is skipped: its row was never overwritten). Returns the number of records restored.
        Idempotent: a crash while restoring is repaired by restoring again.
        """
        fmt = self.fmt
        restored = 0
        with self.lock:
            epochs = [s for s in undo_epochs(self.path.parent, self.key) if s >= step]
            for s in sorted(epochs, reverse=True):
                table = tables.get(s)
                if table is None:
                    raise BankFileError(f"{undo_path(self.path.parent, self.key, s)}: undo log of a checkpoint whose "
                                        "metadata is missing; cannot roll the disk tier back safely")
                for row, data in read_undo(undo_path(self.path.parent, self.key, s), fmt.stride):
                    rec = torch.from_numpy(data.copy()).view(1, fmt.stride)
                    has = table["state_rows"][row:row + 1]
                    if not bool((fmt.checksums(rec, has) == table["checksums"][row:row + 1]).all()):
                        continue
                    buf = self._buffer(1, fmt.stride)
                    buf.copy_(rec)
                    self.io.write_rows([row], buf, fmt.stride)
                    restored += 1
            self.io.flush()
            for s in epochs:
                undo_path(self.path.parent, self.key, s).unlink(missing_ok=True)
            fsync_dir(self.path.parent)
            self.snapshot_step = step
            self.dirty[:] = False
            self.checksums = tables[step]["checksums"].clone()
        return restored

    def close(self) -> None:
        if self.undo is not None:
            self.undo.close()
            self.undo = None
        self.io.close()


# ---------------------------------------------------------------------------------------------------- levels
class Level:
    """A bank level (or the generic block) on one tier; see the module docstring."""

    tier = "device"

    def __init__(self, key: str, fmt: RowFormat, nodes: int, compute_device: torch.device):
        self.key, self.fmt, self.nodes = key, fmt, nodes
        self.compute_device = compute_device
        self.steps = torch.zeros(nodes, dtype=torch.int64, device=compute_device)
        self.state_rows = torch.zeros(nodes, dtype=torch.bool)  # rows whose optimizer state has been written

    def fetch(self, rows: torch.Tensor, with_state: bool) -> RowBatch:
        raise NotImplementedError

    def store(self, rows: torch.Tensor, batch: RowBatch) -> None:
        raise NotImplementedError

    def prefetch(self, rows: torch.Tensor, with_state: bool) -> None:
        """A hint that `rows` will be fetched soon; tiers that stage do so now."""

    def flush(self) -> None:
        """Wait until every queued write has landed in the storage."""

    def read_range(self, a: int, b: int, with_state: bool) -> RowBatch:
        raise NotImplementedError

    def write_range(self, a: int, batch: RowBatch) -> None:
        raise NotImplementedError

    def set_steps(self, steps: torch.Tensor) -> None:
        self.steps = steps.to(device=self.compute_device, dtype=torch.int64).clone()

    def close(self) -> None:
        pass


class DeviceLevel(Level):
    tier = "device"

    def __init__(self, key: str, fmt: RowFormat, nodes: int, compute_device: torch.device):
        super().__init__(key, fmt, nodes, compute_device)
        self.storage = TensorStorage(fmt, nodes, compute_device, dense_state=True)

    def fetch(self, rows: torch.Tensor, with_state: bool) -> RowBatch:
        return self.storage.read(rows, with_state, self.state_rows[rows])

    def fetch_state(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the optimizer state of rows (the update has their values from the fetch)."""
        st = self.storage
        if st.m is None:
            return (torch.zeros((len(rows), self.fmt.numel), dtype=self.fmt.m_dtype, device=st.device),
                    torch.zeros((len(rows), self.fmt.v_numel), dtype=self.fmt.v_dtype, device=st.device))
        idx = to_device(rows, st.device)
        return st.m.index_select(0, idx), st.v.index_select(0, idx)

    def store(self, rows: torch.Tensor, batch: RowBatch) -> None:
        self.storage.write(rows, batch)
        if batch.has_state:
            self.state_rows[rows] = True

    def update_in_place(self, rows: torch.Tensor, grad: torch.Tensor, steps: torch.Tensor, hyper: AdamHyper,
                        scale: torch.Tensor | None) -> None:
        """AdamW of `rows` where their values and moments live, from their gradient [U, P] (indexed_adamw.py)."""
        st = self.storage
        st._alloc_state()
        indexed_adamw_(st.params, st.m, st.v, to_device(rows, st.device), grad, steps, hyper, scale)
        self.state_rows[rows] = True

    def read_range(self, a: int, b: int, with_state: bool) -> RowBatch:
        return self.storage.read_range(a, b, with_state, self.state_rows)

    def write_range(self, a: int, batch: RowBatch) -> None:
        self.storage.write_range(a, batch)
        if batch.has_state:
            self.state_rows[a:a + batch.params.shape[0]] = True


@dataclass(eq=False)
class _Staged:
    rows: np.ndarray
    versions: np.ndarray
    with_state: bool
    state_mask: torch.Tensor
    pos: dict[int, int]
    future: Future | None = None
    batch: RowBatch | None = None
    event: object = None
    used: bool = field(default=False)


class PipelinedLevel(Level):
    """A host-RAM or disk level behind the stage / write-back pipeline of the module docstring."""

    def __init__(self, key: str, fmt: RowFormat, nodes: int, compute_device: torch.device,
                 storage: "TensorStorage | FileStorage", tier: str, verify_reads: bool = True):
        super().__init__(key, fmt, nodes, compute_device)
        self.tier = tier
        self.storage = storage
        self.cuda = compute_device.type == "cuda"
        self.verify_reads = verify_reads and isinstance(storage, FileStorage)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix=f"hmlm-bank-{key}")
        self.stream = torch.cuda.Stream(compute_device) if self.cuda else None
        self.version = np.zeros(nodes, dtype=np.int64)
        self.recent: _Staged | None = None
        self.tasks: deque[_Staged] = deque()
        self.staged: dict[int, list[tuple[_Staged, int]]] = {}   # row -> stage tasks holding it, oldest first
        self.pending: list[Future] = []
        self.stats = {"recent": 0, "staged": 0, "sync": 0}
        # memory.host_read (hmlm/bank/uva.py): `uva` = a GPU kernel gathers host rows from page-locked host RAM,
        # `pinned` = one DMA per row from it; set by the store after construction, host tier on CUDA only
        self.host_read = "staged"
        self.pinned = None

    @property
    def disk(self) -> bool:
        return isinstance(self.storage, FileStorage)

    # ------------------------------------------------------------------ worker side
    def _read_to_device(self, rows: torch.Tensor, with_state: bool,
                        state_mask: torch.Tensor) -> tuple[RowBatch, object]:
        """Read rows from the storage into (pinned) host buffers and on to the compute device; verify disk reads."""
        if self.disk:
            host = self.storage.read(rows, with_state, state_mask, verify=self.verify_reads and not self.cuda)
        elif self.cuda and self.host_read in ("uva", "pinned"):
            return self._read_locked(rows, with_state, state_mask)
        else:
            host = self.storage.read(rows, with_state, state_mask,
                                     out=empty_batch(self.fmt, len(rows), torch.device("cpu"), with_state,
                                                     pin=self.cuda))
        if not self.cuda:
            return host, None
        with torch.cuda.device(self.compute_device), torch.cuda.stream(self.stream):
            dev = host.to(self.fmt, self.compute_device, non_blocking=True)
            if self.verify_reads:
                self.storage.verify(rows, dev.rec, with_state, state_mask)  # checksums on the GPU; blocks this thread
            event = torch.cuda.Event()
            event.record(self.stream)
        return dev, event

    def _read_locked(self, rows: torch.Tensor, with_state: bool,
                     state_mask: torch.Tensor) -> tuple[RowBatch, object]:
        """memory.host_read=uva|pinned: the rows (and moments) read on the side stream straight from the page-locked
        host tensors, by a gather kernel (uva) or one copy-engine DMA per row (pinned); the same values as the staged
        read, never-written moments read as zeros."""
        from .uva import PinnedHost, copy_rows, gather_rows

        st = self.storage
        if self.pinned is None:
            self.pinned = PinnedHost()
        self.pinned.pin(st.params, st.m, st.v)
        read = gather_rows if self.host_read == "uva" else copy_rows
        with torch.cuda.device(self.compute_device), torch.cuda.stream(self.stream):
            idx = to_device(rows, self.compute_device) if self.host_read == "uva" else rows
            dev = empty_batch(self.fmt, len(rows), self.compute_device, with_state)
            read(st.params, idx, dev.params)
            if with_state:
                if st.m is None:
                    dev.m.zero_()
                    dev.v.zero_()
                else:
                    read(st.m, idx, dev.m)
                    read(st.v, idx, dev.v)
                    if not st.dense_state and not bool(state_mask.all()):
                        fresh = to_device(~state_mask, self.compute_device)
                        dev.m[fresh] = 0
                        dev.v[fresh] = 0
            event = torch.cuda.Event()
            event.record(self.stream)
        return dev, event

    def _stage(self, task: _Staged) -> None:
        task.batch, task.event = self._read_to_device(torch.from_numpy(task.rows), task.with_state, task.state_mask)

    def _write_back(self, rows: torch.Tensor, batch: RowBatch, state_mask: torch.Tensor, ready: object) -> None:
        fmt = self.fmt
        checksums = None
        if self.cuda:
            with torch.cuda.device(self.compute_device), torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                src = pack_records(fmt, batch) if self.disk else None
                if self.disk:
                    checksums = fmt.checksums(src, state_mask).cpu()
                    host_rec = aligned_empty(len(rows), fmt.stride, pin=True)
                    host_rec.copy_(src, non_blocking=True)
                    host = RowBatch.of_record(fmt, host_rec, True)
                else:
                    host = empty_batch(fmt, len(rows), torch.device("cpu"), True, pin=True)
                    for dst, s in zip(host.tensors(), batch.tensors()):
                        dst.copy_(s, non_blocking=True)
                for t in batch.tensors() + ([src] if src is not None else []):
                    t.record_stream(self.stream)
                done = torch.cuda.Event()
                done.record(self.stream)
            done.synchronize()
        else:
            host = batch
        if self.disk:
            self.storage.write(rows, pack_records(fmt, host), state_mask, checksums)
        else:
            self.storage.write(rows, host)

    # ------------------------------------------------------------------ main thread
    def prefetch(self, rows: torch.Tensor, with_state: bool) -> None:
        r = rows.numpy().copy()
        task = _Staged(r, self.version[r].copy(), with_state, self.state_rows[rows].clone(),
                       {int(x): i for i, x in enumerate(r.tolist())})
        task.future = self.worker.submit(self._stage, task)
        for i, x in enumerate(r.tolist()):
            self.staged.setdefault(x, []).append((task, i))
        self.tasks.append(task)
        while len(self.tasks) > MAX_STAGED_TASKS:
            self._drop(self.tasks.popleft())

    def _drop(self, task: _Staged) -> None:
        for x in task.rows.tolist():
            left = [e for e in self.staged.get(x, []) if e[0] is not task]
            if left:
                self.staged[x] = left
            else:
                self.staged.pop(x, None)

    def flush(self) -> None:
        for f in self.pending:
            f.result()
        self.pending = []

    def fetch(self, rows: torch.Tensor, with_state: bool, training: bool | None = None) -> RowBatch:
        r = rows.numpy()
        n = len(r)
        sources: list[tuple[object, list[int], list[int]]] = []   # (source, dst positions, src positions)
        by_source: dict[int, tuple[object, list[int], list[int]]] = {}
        sync: list[int] = []
        recent = self.recent
        for i, x in enumerate(r.tolist()):
            src = None
            if recent is not None and x in recent.pos and recent.versions[recent.pos[x]] == self.version[x] \
                    and (recent.with_state or not with_state):
                src, j = recent, recent.pos[x]
                self.stats["recent"] += 1
            else:
                # the oldest valid stage task: the one announced for this fetch (a later one is for a later step)
                for task, j in self.staged.get(x, []):
                    if task.versions[j] == self.version[x] and (task.with_state or not with_state):
                        src = task
                        self.stats["staged"] += 1
                        break
            if src is None:
                sync.append(i)
                continue
            entry = by_source.setdefault(id(src), (src, [], []))
            entry[1].append(i)
            entry[2].append(j)
        sources = list(by_source.values())
        current = torch.cuda.current_stream(self.compute_device) if self.cuda else None
        for src, _, _ in sources:
            if src is not recent:
                src.future.result()   # re-raises a failed read (e.g. a checksum mismatch)
                if self.cuda:
                    current.wait_event(src.event)
                    for t in src.batch.tensors() + ([src.batch.rec] if src.batch.rec is not None else []):
                        t.record_stream(current)
        if sync:
            self.stats["sync"] += len(sync)
            self.flush()
            srows = torch.from_numpy(r[sync])
            batch, event = self._read_to_device(srows, with_state, self.state_rows[srows])
            if self.cuda:
                current.wait_event(event)
                for t in batch.tensors() + ([batch.rec] if batch.rec is not None else []):
                    t.record_stream(current)
            sources.append((_Staged(r[sync], self.version[r[sync]], with_state, self.state_rows[srows], {},
                                    batch=batch), sync, list(range(len(sync)))))
        if len(sync) == n and not with_state:
            # every row read now, for this fetch alone, without state (one prompt's fetch at inference): that batch
            # is the answer, without a copy into a new one. Staged and recent batches are never handed out as they
            # are: other fetches may read them and the update writes into what a fetch returns
            return sources[-1][0].batch
        out = empty_batch(self.fmt, n, self.compute_device, with_state, record=with_state)
        for src, dst, pos in sources:
            d = to_device(torch.tensor(dst, dtype=torch.long), self.compute_device)
            p = to_device(torch.tensor(pos, dtype=torch.long), self.compute_device)
            for o, s in zip(out.tensors(), src.batch.tensors()):
                o.index_copy_(0, d, s.index_select(0, p))
        # a training fetch consumes the stage tasks up to the newest one it used (the loader announces batches in
        # order); an inference fetch leaves them for the training step they were announced for. A training fetch is
        # one with state, or one told so (host rows updated by the CPU Adam travel without their state)
        training = with_state if training is None else training
        used = [src for src, _, _ in sources if any(src is t for t in self.tasks)] if training else []
        if used:
            last = max(i for i, t in enumerate(self.tasks) if any(t is u for u in used))
            for _ in range(last + 1):
                self._drop(self.tasks.popleft())
        return out

    def store(self, rows: torch.Tensor, batch: RowBatch) -> None:
        r = rows.numpy().copy()
        self.version[r] += 1
        if batch.has_state:
            self.state_rows[rows] = True
        mask = self.state_rows[rows].clone()
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.compute_device))
        self.recent = _Staged(r, self.version[r].copy(), batch.has_state, mask,
                              {int(x): i for i, x in enumerate(r.tolist())}, batch=batch)
        self.pending = [f for f in self.pending if not f.done()]
        self.pending.append(self.worker.submit(self._write_back, rows.clone(), batch, mask, ready))

    def update_on_host(self, rows: torch.Tensor, grad: torch.Tensor, steps: torch.Tensor, hyper: object,
                       adam: object) -> None:
        """memory.host_update=cpu_adam: queue the in-place update of rows in host RAM behind this level's earlier
        tasks. The gradient and step counts (device tensors, clip factor applied) come to pinned memory on the side
        stream, then `adam` (cpu_adam.HostAdam) updates the rows and their moments. The versions move now, like a
        write-back's, so no stage task queued earlier serves the old values and a synchronous read waits for it."""
        r = rows.numpy().copy()
        self.version[r] += 1
        fresh = ~self.state_rows[rows]
        self.state_rows[rows] = True
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.compute_device))
        self.pending = [f for f in self.pending if not f.done()]
        self.pending.append(self.worker.submit(self._host_update, rows.clone(), grad, steps, fresh, hyper, adam,
                                               ready))

    def _host_update(self, rows: torch.Tensor, grad: torch.Tensor, steps: torch.Tensor, fresh: torch.Tensor,
                     hyper: object, adam: object, ready: object) -> None:
        if self.cuda:
            with torch.cuda.device(self.compute_device), torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (grad, steps)]
                for dst, src in zip(host, (grad, steps)):
                    dst.copy_(src, non_blocking=True)
                    src.record_stream(self.stream)
                done = torch.cuda.Event()
                done.record(self.stream)
            done.synchronize()
            grad, steps = host
        adam.update_rows(self.storage, rows, grad, steps.cpu(), fresh, hyper)

    def invalidate(self) -> None:
        """Forget staged and recent rows (after a bulk write, a restore or a restriction)."""
        self.flush()
        for task in list(self.tasks):
            if task.future is not None:
                task.future.result()
        self.tasks.clear()
        self.staged.clear()
        self.recent = None
        self.version += 1
        if self.pinned is not None:
            self.pinned.release()   # a restriction or restore may have replaced the host tensors

    def read_range(self, a: int, b: int, with_state: bool) -> RowBatch:
        self.flush()
        return self.storage.read_range(a, b, with_state, self.state_rows)

    def write_range(self, a: int, batch: RowBatch) -> None:
        self.invalidate()
        if self.disk:
            self.storage.write_range(a, batch, self.state_rows | batch.has_state)
        else:
            self.storage.write_range(a, batch)
        if batch.has_state:
            self.state_rows[a:a + batch.params.shape[0]] = True

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.worker.shutdown(wait=True)
            if self.pinned is not None:
                self.pinned.release()
            self.storage.close()


def level_bytes(level: Level) -> int:
    return level.nodes * level.fmt.numel * torch.empty((), dtype=level.fmt.dtype).element_size()

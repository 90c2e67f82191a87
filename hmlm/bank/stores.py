"""Bank stores: where the memory blocks live, how a batch's blocks are fetched, and how they are updated.

The bank is *not* an nn.Module: Lightning/DDP/DeepSpeed never see it, so they neither all-reduce nor ZeRO-shard a
multi-billion bank that is read a few blocks at a time (docs/design.md §3). Each step:

    prefetch(paths)  the data loader's next batch: host/disk levels start staging its unique blocks (levels.py)
    fetch(paths)     per level, one gather of the batch's unique blocks into a leaf [U, P] on the compute device (in
                     the compute dtype), expanded to per-sample tensors (concatenated over levels along the rank
                     axis, layer-major) by one autograd op (gather.py)
    backward         fills each leaf's .grad (summed over the samples sharing a block in float32)
    step(...)        clips the memory gradient separately from the anchor's (the norm stays a device tensor), then
                     runs lazy block-wise AdamW on exactly the fetched rows of every level at once (optim.py)

`TieredStore` keeps each level on its tier (`device`, `host`, `disk`; tiers.py plans them); the generic block always on
the device. `DeviceStore` and `HostStore` are the same store with every level on one tier (the `memory.store: device
| host` shorthands). A bank key is `l{level}` (0-based tree level) or `generic`.

Public API (what the training loop, subtree-parallel sync, export, inspect and other backends use):
    fetch / prefetch / step / discard_fetched
    fetched_grads() -> [(key, rows, grad [U, P])]; replace_fetched_grads([...])   (subtree-parallel reduction)
    keys(), tier_of(key), format_of(key), nodes(key), named_tensors(key), read_rows / write_rows
    save(dir) / load(dir)                           the model directory's bank files
    save_checkpoint(dir, step) / load_checkpoint(dir, manifest)   crash-consistent training checkpoints
    state_dict() / load_state_dict()                small banks and per-rank checkpoint files
    restrict(held), local_rows(key, rows)           subtree-parallel ranks
    flush(), close()
"""
from __future__ import annotations

import json
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from ..utils import write_json
from .blockio import BlockIOFactory, ThreadPoolBlockIO, aligned_empty
from .layout import BankLayout
from .levelfile import (HEADER, BankFileError, check_level_file, create_level_file, fsync_dir, new_file_id,
                        read_meta, write_meta)
from .gather import gather_layout, on_device, plan_level
from .levels import (DeviceLevel, FileStorage, Level, PipelinedLevel, RowBatch, TensorStorage, pack_records,
                     to_device)
from .optim import AdamHyper, RowUpdater, UpdateGroup, fused_adamw
from .uva import check_host_read, resolve_host_read
from .rows import DTYPE_NAMES, RowFormat, checksums_via
from .safefile import SafetensorsError, read_header, read_tensor, tensor_slice, write_streamed

GENERIC = "generic"
BANK_FILE_FORMAT = "hmlm-bank-rows-1"
CHUNK_BYTES = 64 << 20       # bulk I/O (initialisation, export, checkpoints) moves rows in chunks of about this size


def level_seed(seed: int, key: str) -> int:
    return seed * 1000 + (999 if key == GENERIC else int(key[1:]))


def bounded_map(fn, items: Iterable, workers: int) -> Iterator:
    """fn over items on `workers` threads, results in order, at most 2 x workers in flight (bounded memory)."""
    items = iter(items)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="hmlm-bank-init") as ex:
        window = [ex.submit(fn, x) for _, x in zip(range(2 * max(1, workers)), items)]
        while window:
            yield window.pop(0).result()
            nxt = next(items, None)
            if nxt is not None:
                window.append(ex.submit(fn, nxt))


@dataclass
class _Fetched:
    key: str
    rows: torch.Tensor                 # local row numbers (CPU)
    leaf: torch.Tensor | None          # [U, P] in the compute dtype, requires grad; None for a replace_fetched_grads group
    batch: RowBatch | None = None      # the rows in storage dtypes (values; optimizer state when staged with them)
    grad: torch.Tensor | None = None   # replaces leaf.grad (replace_fetched_grads)

    def gradient(self) -> torch.Tensor | None:
        return self.grad if self.grad is not None else (None if self.leaf is None else self.leaf.grad)


class _BlockCache:
    """Inference: an LRU of fetched host/disk blocks kept on the device (shallow blocks recur across prompts)."""

    def __init__(self, capacity_bytes: int):
        self.capacity, self.used = capacity_bytes, 0
        self.entries: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str, row: int) -> torch.Tensor | None:
        t = self.entries.get((key, row))
        if t is not None:
            self.entries.move_to_end((key, row))
            self.hits += 1
        else:
            self.misses += 1
        return t

    def put(self, key: str, row: int, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.capacity:
            return
        self.entries[(key, row)] = t
        self.used += size
        while self.used > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.used -= old.numel() * old.element_size()

    def drop(self, key: str, rows: Iterable[int] | None = None) -> None:
        for k in [k for k in self.entries if k[0] == key and (rows is None or k[1] in set(rows))]:
            old = self.entries.pop(k)
            self.used -= old.numel() * old.element_size()


class TieredStore:
    """The bank, one level per tier. See the module docstring for the API; docs/design.md §6 for the why."""

    forced_tier: str | None = None

    def __init__(self, layout: BankLayout, *, generic: bool = True, dtype: torch.dtype = torch.float32,
                 seed: int = 0, init: bool = True, tiers: Sequence[str] | None = None, optim_state: str = "fp32",
                 disk_dir: str | Path | None = None, io_threads: int = 8, cache_mb: float = 0.0,
                 io_factory: BlockIOFactory | None = None, updater: RowUpdater | None = None,
                 open_disk: bool = True, disk_io: str = "auto", host_update: str = "auto", host_read: str = "auto"):
        self.layout = layout
        self.open_disk = open_disk   # reopen an existing disk-tier level file (training resumes; not inference)
        self.dtype = dtype
        self.seed = seed
        self.init = init
        self.optim_state = optim_state
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.io_threads = io_threads
        self.io_factory = io_factory   # None: chosen by `disk_io` when the first disk level is made (aio.py)
        self.disk_io = disk_io
        from .cpu_adam import resolve_host_update

        self.host_update = resolve_host_update(host_update, optim_state)
        self.host_read = check_host_read(host_read)   # resolved per level for its compute device (uva.py)
        self._host_adam = None   # cpu_adam.HostAdam, made at the first update of a host level
        self.updater: RowUpdater = updater or fused_adamw
        self.compute_device = torch.device("cpu")
        self.formats: dict[str, RowFormat] = {}
        self.node_counts: dict[str, int] = {}
        for lvl in layout.active_levels:
            key = f"l{lvl}"
            self.formats[key] = RowFormat(layout.spec(layout.sizes[lvl]), dtype, optim_state)
            self.node_counts[key] = layout.nodes(lvl)
        if generic and layout.total_rank > 0:
            self.formats[GENERIC] = RowFormat(layout.spec(layout.total_rank), dtype, optim_state)
            self.node_counts[GENERIC] = 1
        per_level = list(tiers) if tiers is not None else None
        if self.forced_tier is not None:
            per_level = [self.forced_tier] * len(layout.sizes)
        self.tiers: dict[str, str] = {}
        for key in self.formats:
            if key == GENERIC or per_level is None:
                self.tiers[key] = "device"
            else:
                self.tiers[key] = per_level[int(key[1:])]
        if "disk" in self.tiers.values() and self.disk_dir is None:
            raise ValueError("a disk tier needs a directory for its level files (memory.disk_dir)")
        self.levels: dict[str, Level] = {}
        self._fetched: list[_Fetched] = []
        self.cache = _BlockCache(int(cache_mb * (1 << 20))) if cache_mb > 0 else None
        self.cache_keys: set[str] | None = None   # the keys the cache may hold (None: every host/disk level)
        # subtree-parallel ranks hold only some rows per key (`restrict`): their global node ids, sorted, and the
        # global -> local row lookup (-1 = not held). Empty = every row is held.
        self.held: dict[str, torch.Tensor] = {}
        self._local: dict[str, torch.Tensor] = {}
        self._snapshot: tuple[str, int, dict] | None = None
        self._steps_taken = 0
        self._pending_load: Path | None = None

    # ---------------------------------------------------------------- construction and placement
    @classmethod
    def from_recipe(cls, layout: BankLayout, memory_cfg: Any, *, seed: int, init: bool,
                    tiers: Sequence[str] | None, training: bool = True) -> "TieredStore":
        from .rows import DTYPES

        return cls(layout, generic=memory_cfg.generic, dtype=DTYPES[memory_cfg.dtype], seed=seed, init=init,
                   tiers=tiers, optim_state=memory_cfg.optim_state, disk_dir=memory_cfg.disk_dir,
                   io_threads=memory_cfg.io_threads, cache_mb=memory_cfg.cache_mb, open_disk=training,
                   disk_io=memory_cfg.disk_io, host_update=memory_cfg.host_update, host_read=memory_cfg.host_read)

    @property
    def has_generic(self) -> bool:
        return GENERIC in self.formats

    @property
    def tier(self) -> str:
        tiers = set(self.tiers.values())
        return tiers.pop() if len(tiers) == 1 else "tiered"

    def keys(self) -> list[str]:
        return list(self.formats)

    def tier_of(self, key: str) -> str:
        return self.tiers[key]

    def format_of(self, key: str) -> RowFormat:
        return self.formats[key]

    def nodes(self, key: str) -> int:
        """Rows this store holds for `key` (all nodes, or a subtree-parallel rank's share)."""
        return len(self.held[key]) if key in self.held else self.node_counts[key]

    def to_compute(self, device: torch.device | str) -> "TieredStore":
        """Place the store for training/inference on `device` (the anchor's device); levels are created there."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self.levels and device != self.compute_device:
            self._move(device)
        self.compute_device = device
        self._materialize()
        return self

    def _materialize(self) -> None:
        if self.levels:
            return
        for key, fmt in self.formats.items():
            self.levels[key] = self._make_level(key, fmt, create=self.init)
        if self.init:
            self._initialise()
        self.init = False  # later placements move the values, they never re-draw them

    def disk_io_factory(self) -> BlockIOFactory:
        """The disk tier's BlockIO (memory.disk_io), resolved once: DeepSpeed's op is built only for a disk tier."""
        if self.io_factory is None:
            from .aio import block_io_factory

            self.io_factory = block_io_factory(self.disk_io)
        return self.io_factory

    def _make_level(self, key: str, fmt: RowFormat, *, create: bool) -> Level:
        tier, dev, nodes = self.tiers[key], self.compute_device, self.nodes(key)
        if tier == "device":
            return DeviceLevel(key, fmt, nodes, dev)
        if tier == "host":
            level = PipelinedLevel(key, fmt, nodes, dev, TensorStorage(fmt, nodes, torch.device("cpu"),
                                                                       dense_state=False), "host")
            level.host_read = resolve_host_read(self.host_read, dev)
            return level
        assert self.disk_dir is not None
        path = self.disk_dir / f"{key}.level"
        if not create and not self.open_disk:
            # an inference load attaches the model directory's file instead (load)
            return _PendingDisk(key, fmt, nodes, dev)
        # a resume reopens the working file (load_checkpoint checks it is the checkpoint's); otherwise a new one
        storage = FileStorage(fmt, nodes, path, key=key, create=create or not path.is_file(), threads=self.io_threads,
                              io_factory=self.disk_io_factory(), pin=dev.type == "cuda")
        storage.checksum_device = dev
        return PipelinedLevel(key, fmt, nodes, dev, storage, "disk")

    def _move(self, device: torch.device) -> None:
        for key, level in list(self.levels.items()):
            level.compute_device = device
            level.steps = level.steps.to(device)
            if isinstance(level, DeviceLevel):
                st = level.storage
                st.device = device
                st.params = st.params.to(device)
                if st.m is not None:
                    st.m, st.v = st.m.to(device), st.v.to(device)
            elif isinstance(level, PipelinedLevel):
                level.invalidate()
                level.cuda = device.type == "cuda"
                level.stream = torch.cuda.Stream(device) if level.cuda else None
                if not level.disk:
                    level.host_read = resolve_host_read(self.host_read, device)
                if isinstance(level.storage, FileStorage):
                    level.storage.pin = level.cuda
                    level.storage.checksum_device = device
        if self.cache is not None:
            self.cache = _BlockCache(self.cache.capacity)

    def _initialise(self) -> None:
        """Draw every block's initial values: chunks of rows on CPU threads, each chunk from its own generator.

        The chunking depends only on the row size, so the values are identical whichever tier holds the level (the
        test of tier equivalence relies on it); each chunk goes straight to where the level lives.
        """
        memory = self.layout.memory
        for key, level in self.levels.items():
            fmt = level.fmt
            rows_per = max(1, CHUNK_BYTES // 4 // fmt.numel)
            nodes = level.nodes
            base = level_seed(self.seed, key)

            def make(a: int, fmt=fmt, nodes=nodes, base=base, rows_per=rows_per) -> tuple[int, torch.Tensor]:
                b = min(nodes, a + rows_per)
                gen = torch.Generator().manual_seed((base * 0x9E3779B1 + a) % (1 << 62))
                tensors = {p.name: torch.zeros((b - a, *p.shape), dtype=torch.float32) for p in fmt.pieces}
                memory.init_block(tensors, gen)
                return a, fmt.flatten(tensors).to(fmt.dtype)

            for a, rows in bounded_map(make, range(0, nodes, rows_per), self.io_threads):
                level.write_range(a, RowBatch(rows))

    def close(self) -> None:
        for level in self.levels.values():
            level.close()
        self.levels = {}
        if self._host_adam is not None:
            self._host_adam.close()
            self._host_adam = None

    def flush(self) -> None:
        for level in self.levels.values():
            level.flush()

    # ---------------------------------------------------------------- fetch
    def fetch(self, paths: torch.Tensor, *, generic_mask: torch.Tensor | None = None,
              grad: bool = False, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Per-sample memory tensors [B, *spec(R)] for paths [B, levels] (global node id per level).

        Samples with generic_mask[i] get the generic block instead of their path's blocks (same size). With grad=True
        the gathered blocks are leaves whose gradients `step` applies. Pass paths on the CPU (the training loop does):
        paths on an accelerator cost a device-to-host synchronisation here.

        `dtype` is the dtype the memory is computed in (autocast's, e.g. bfloat16; default float32). The tensors come
        in that dtype, each laid out layer-major (a [B, L, ...] view of a contiguous [L, B, ...] tensor), so the
        anchor's per-layer slice is contiguous and needs no cast: at the 160M shape on an H100, casting strided fp32
        slices per layer (forward and backward) cost more than the memory's matmuls. The leaves whose gradients the
        step reads are the fetched rows in that dtype too; the per-sample gather sums their gradient in float32 and
        rounds once (gather.py, docs/design.md §6.8).
        """
        self._materialize()
        paths = paths.detach()
        if paths.device.type != "cpu":
            paths = paths.cpu()
        paths = paths.long()
        batch = paths.shape[0]
        gmask = torch.zeros(batch, dtype=torch.bool) if generic_mask is None else generic_mask.detach().cpu().bool()
        if gmask.any() and not self.has_generic:
            raise ValueError("generic memory requested, but this bank was built without a generic block "
                             "(memory.generic=false)")
        if paths.shape[1] < len(self.layout.sizes):
            raise ValueError(f"paths have {paths.shape[1]} levels, the bank has {len(self.layout.sizes)}")
        spec = self.layout.spec(self.layout.total_rank)
        if grad:
            self._fetched = []
        dev, dtype = self.compute_device, dtype or torch.float32
        path_rows = (~gmask).nonzero().squeeze(1)
        any_generic = bool(gmask.any())
        requests: list[tuple[str, torch.Tensor]] = []   # (key, local rows): every block this fetch reads
        inverses = []
        if len(path_rows):
            for lvl in self.layout.active_levels:
                nodes = paths[path_rows, lvl]
                n = self.layout.nodes(lvl)
                if nodes.min() < 0 or nodes.max() >= n:
                    raise ValueError(f"level-{lvl + 1} node ids must be in [0, {n}), "
                                     f"got {nodes.min().item()}..{nodes.max().item()}")
                unique, inverse = torch.unique(nodes, return_inverse=True)
                key = f"l{lvl}"
                requests.append((key, self.local_rows(key, unique)))
                inverses.append(inverse)
        if any_generic:
            requests.append((GENERIC, self.local_rows(GENERIC, torch.zeros(1, dtype=torch.long))))
        leaves = self._leaves(requests, grad, dtype)
        generic = self.formats[GENERIC].named(leaves[-1].to(dtype)) if any_generic else None
        # per level: a table of the level's fetched rows (+ the generic block's share of this level's rank, as one
        # more row) and each sample's row in it; then one gather of every level into the layer-major outputs
        tables, plans = [], []
        offset = 0
        for i, lvl in enumerate(self.layout.active_levels):
            key, r = f"l{lvl}", self.layout.sizes[lvl]
            fmt = self.formats[key]
            parts, index = [], torch.empty(batch, dtype=torch.long)
            if len(path_rows):
                parts.append(leaves[i].to(dtype))
                index[path_rows] = inverses[i]
            if generic is not None:
                share = {name: t.narrow(1 + spec[name].rank_axis, offset, r) for name, t in generic.items()}
                index[gmask] = parts[0].shape[0] if parts else 0
                parts.append(fmt.flatten(share))
            tables.append(parts[0] if len(parts) == 1 else torch.cat(parts))
            plans.append(plan_level(fmt, index, offset, r))
            offset += r
        return gather_layout(spec, on_device(plans, dev), batch, tables)

    def _leaves(self, requests: list[tuple[str, torch.Tensor]], grad: bool, dtype: torch.dtype) -> list[torch.Tensor]:
        """The rows [U, P] of every (key, local rows) of one fetch, in `dtype` (a store that gathers all keys at once,
        e.g. zero3, overrides this and may return another dtype: fetch casts)."""
        return [self._leaf(key, rows, grad, dtype) for key, rows in requests]

    def _leaf(self, key: str, rows: torch.Tensor, grad: bool, dtype: torch.dtype) -> torch.Tensor:
        level = self.levels[key]
        if grad:
            # staged tiers bring the rows' optimizer state along (one read); the device tier reads it at step time,
            # host rows updated by the CPU Adam need only their values on the device
            with_state = isinstance(level, PipelinedLevel) and not self.updates_on_host(key)
            batch = level.fetch(rows, with_state, training=True) if isinstance(level, PipelinedLevel) \
                else level.fetch(rows, with_state)
            # the leaf is in the compute dtype: with a bf16 bank under bf16 autocast it is the fetched rows themselves
            # (no copy; its gradient comes in bf16, summed in float32 by the gather). The update reads the values in
            # their storage dtype from `batch`, so a leaf of lower precision than the bank never rounds them.
            leaf = batch.params.detach().to(dtype).requires_grad_(True)
            self._fetched.append(_Fetched(key, rows, leaf, batch))
            return leaf
        if self.cache is None or level.tier == "device" or (self.cache_keys is not None and key not in self.cache_keys):
            return level.fetch(rows, False).params.to(dtype)
        got = [self.cache.get(key, int(r)) for r in rows.tolist()]
        missing = [i for i, t in enumerate(got) if t is None]
        if missing:
            fresh = level.fetch(rows[missing], False).params
            for j, i in enumerate(missing):
                got[i] = fresh[j]
                self.cache.put(key, int(rows[i]), fresh[j])
        return torch.stack(got).to(dtype)

    def prefetch(self, paths: torch.Tensor, *, with_state: bool = True) -> None:
        """Announce a batch's paths [B, levels] before it is fetched: host/disk levels start staging its blocks.

        Rows this rank does not hold (subtree-parallel) are skipped; a wrong announcement only costs I/O.
        """
        self._materialize()
        paths = paths.detach().cpu().long()
        for lvl in self.layout.active_levels:
            key = f"l{lvl}"
            level = self.levels[key]
            if not isinstance(level, PipelinedLevel):
                continue
            rows = torch.unique(paths[:, lvl])
            rows = rows[(rows >= 0) & (rows < self.layout.nodes(lvl))]
            if key in self._local:
                rows = self._local[key][rows]
                rows = rows[rows >= 0]
            if len(rows):
                level.prefetch(rows, with_state and not self.updates_on_host(key))

    # ---------------------------------------------------------------- subtree-parallel restriction
    def restrict(self, held: dict[str, "torch.Tensor | list[int]"]) -> None:
        """Keep only the given rows (global node ids) of each key, e.g. the blocks a subtree-parallel rank owns.

        Fetching a row that is not held is an error; fetched groups and the optimizer state then use local rows.
        """
        if self.held:
            raise RuntimeError("this store is already restricted to a subset of its blocks")
        self._materialize()
        for key, rows in held.items():
            rows = torch.as_tensor(rows, dtype=torch.long).unique()
            nodes = self.node_counts[key]
            if len(rows) and (rows.min() < 0 or rows.max() >= nodes):
                raise ValueError(f"bank key {key}: held rows must be in [0, {nodes})")
            level = self.levels[key]
            if level.tier == "disk":
                raise ValueError("trainer.data_parallel=subtree keeps each rank's blocks in memory; put every level "
                                 "on the device or host tier (memory.tiers)")
            level.flush()
            if isinstance(level, PipelinedLevel):
                level.invalidate()
                level.version = level.version[rows.numpy()]
            level.storage.restrict(rows)
            level.steps = level.steps.index_select(0, rows.to(level.steps.device))
            level.state_rows = level.state_rows[rows]
            level.nodes = len(rows)
            local = torch.full((nodes,), -1, dtype=torch.long)
            local[rows] = torch.arange(len(rows))
            self.held[key], self._local[key] = rows, local

    def local_rows(self, key: str, rows) -> torch.Tensor:
        """Local row numbers of global node ids `rows` of `key` (the ids themselves when the key is not restricted)."""
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        if key not in self._local:
            return rows
        local = self._local[key][rows]
        if (local < 0).any():
            missing = rows[local < 0][:5].tolist()
            lvl = "the generic block" if key == GENERIC else f"level {int(key[1:]) + 1}"
            raise ValueError(f"{lvl} blocks {missing} are not held by this rank: with trainer.data_parallel=subtree "
                             "a rank may only fetch the blocks of the subtrees it owns (see docs/distributed.md)")
        return local

    # ---------------------------------------------------------------- update
    def fetched_grads(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(key, local rows [U], gradient [U, P] float32) of every group fetched with grad=True since the last step."""
        return [(f.key, f.rows, g.float()) for f in self._fetched if (g := f.gradient()) is not None]

    def replace_fetched_grads(self, groups: Sequence[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        """Set the gradients `step` applies: a group given with the rows tensor of a fetched group reuses it, any
        other group (e.g. shared blocks reduced from other ranks) is read from its tier at step time."""
        by_rows = {id(f.rows): f for f in self._fetched}
        out = []
        for key, rows, grad in groups:
            f = by_rows.get(id(rows))
            if f is not None and f.key == key:
                out.append(_Fetched(key, rows, f.leaf, f.batch, grad))
            else:
                out.append(_Fetched(key, torch.as_tensor(rows, dtype=torch.long).cpu(), None, None, grad))
        self._fetched = out

    def discard_fetched(self) -> None:
        self._fetched = []

    def fetched_grad_norm(self) -> torch.Tensor:
        grads = [f.gradient() for f in self._fetched if f.gradient() is not None]
        if not grads:
            return torch.zeros((), device=self.compute_device)
        # accumulated in float32 whatever the gradients' dtype (bf16 leaves under bf16 autocast), no float32 copies
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
        return torch.linalg.vector_norm(torch.stack(norms))

    @torch.no_grad()
    def step(self, *, lr: float, weight_decay: float, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
             grad_clip: float = 0.0, grad_norm: torch.Tensor | None = None) -> dict[str, Any]:
        """Lazy AdamW on the blocks fetched (with grad=True) since the last step; returns stats.

        `grad_norm` overrides the norm used for clipping (a subtree-parallel run passes the norm over all ranks). No
        host synchronisation: the norm and the clip factor stay on the device.
        """
        groups = [f for f in self._fetched if f.gradient() is not None]
        norm = self.fetched_grad_norm() if grad_norm is None else grad_norm
        scale = (grad_clip / (norm + 1e-6)).clamp(max=1.0) if grad_clip > 0 else None
        dev = self.compute_device
        hyper = AdamHyper(lr, beta1, beta2, eps, weight_decay)
        # an updater that takes values, gradient and moments in their own dtypes (fused_adamw) reads and rounds into
        # the fetched rows in place; the float32 reference (lazy_adamw) gets float32 copies, written back after
        native = getattr(self.updater, "storage_dtypes", False)
        # an updater that declares `in_place_rows` (fused_adamw) lets device-tier rows be updated in place
        in_place = getattr(self.updater, "in_place_rows", False)
        work = []
        for f in groups:
            level = self.levels[f.key]
            rows_dev = to_device(f.rows, dev)
            level.steps.index_add_(0, rows_dev, torch.ones_like(rows_dev))
            if self.updates_on_host(f.key):
                grad = f.gradient().float()
                level.update_on_host(f.rows, grad * scale if scale is not None else grad,
                                     level.steps.index_select(0, rows_dev), hyper, self.host_adam())
                continue
            batch = f.batch
            if (in_place and isinstance(level, DeviceLevel) and level.fmt.optim_state != "factored"
                    and batch is not None and not batch.has_state):
                level.update_in_place(f.rows, f.gradient(), level.steps.index_select(0, rows_dev), hyper, scale)
                continue
            if batch is not None and not batch.has_state and isinstance(level, DeviceLevel):
                # the values came with the fetch; only the moments are read, and the rows are written back whole
                m, v = level.fetch_state(f.rows)
                batch = RowBatch(batch.params, m, v)
            elif batch is None or not batch.has_state:
                batch = level.fetch(f.rows, True)
            grad = f.gradient()
            if native:
                g = UpdateGroup(level.fmt, batch.params, grad, batch.m, batch.v, level.steps.index_select(0, rows_dev))
            else:
                g = UpdateGroup(level.fmt, batch.params.float(), grad.float(), batch.m.float(), batch.v.float(),
                                level.steps.index_select(0, rows_dev))
            work.append((f, level, batch, g))
        self.updater([w[3] for w in work], hyper, scale)
        for f, level, batch, g in work:
            for dst, src in ((batch.params, g.params), (batch.m, g.m), (batch.v, g.v)):
                if src is not dst:
                    dst.copy_(src)
            level.store(f.rows, batch)
        for f in groups:
            if self.cache is not None:
                self.cache.drop(f.key, f.rows.tolist())
        updated = sum(len(f.rows) for f in groups)
        self._fetched = []
        self._steps_taken += 1
        return {"grad_norm": norm, "blocks_updated": float(updated)}

    def updates_on_host(self, key: str) -> bool:
        """Whether `key`'s rows are updated in host RAM by DeepSpeed's CPU Adam (memory.host_update=cpu_adam)."""
        return self.host_update == "cpu_adam" and self.tiers.get(key) == "host"

    def ops_used(self) -> dict[str, str | None]:
        """The block I/O serving the disk tier (aio | threads), where host rows are updated (gpu | cpu_adam) and how
        they are read (staged | pinned | uva); None where the bank has no such level (bench rows record them)."""
        ios = [getattr(getattr(lv, "storage", None), "io", None) for lv in self.levels.values() if lv.tier == "disk"]
        ios = [io for io in ios if io is not None]
        host = [lv for lv in self.levels.values() if lv.tier == "host"]
        return {"disk_io": getattr(ios[0], "backend", "threads") if ios else None,
                "host_update": self.host_update if "host" in self.tiers.values() else None,
                "host_read": getattr(host[0], "host_read", None) if host else None}

    def host_adam(self):
        if self._host_adam is None:
            from .cpu_adam import HostAdam

            self._host_adam = HostAdam()
        return self._host_adam

    # ---------------------------------------------------------------- rows, for tools and tests
    def read_rows(self, key: str, rows=None, *, with_state: bool = False) -> RowBatch:
        """Rows (local numbers; all when None) of `key` in storage dtypes on the storage device."""
        self._materialize()
        level = self.levels[key]
        level.flush()
        if rows is None:
            return level.read_range(0, level.nodes, with_state)
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        if isinstance(level, PipelinedLevel):
            return level.storage.read(rows, with_state, level.state_rows[rows])
        return level.fetch(rows, with_state)

    def write_rows(self, key: str, rows, values: torch.Tensor) -> None:
        """Overwrite the values (not the optimizer state) of rows [U] of `key` with values [U, P]."""
        self._materialize()
        level = self.levels[key]
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        values = values.to(level.fmt.dtype)
        if len(rows) and bool((rows[1:] == rows[:-1] + 1).all()):
            level.write_range(int(rows[0]), RowBatch(values))
            return
        for i, r in enumerate(rows.tolist()):
            level.write_range(r, RowBatch(values[i:i + 1]))
        if self.cache is not None:
            self.cache.drop(key)

    @property
    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Views [nodes, *shape] of the values of every level held in memory (device or host tier).

        For small banks, tools and tests: writing into a view bypasses staging and the optimizer, so only do it before
        training. Disk-tier levels have no such view (use read_rows / write_rows).
        """
        self._materialize()
        out = {}
        for key, level in self.levels.items():
            if not isinstance(level.storage if hasattr(level, "storage") else None, TensorStorage):
                raise ValueError(f"bank level {key} is on the disk tier: use store.read_rows / write_rows")
            level.flush()
            out[key] = level.fmt.named(level.storage.params)
        return out

    def named_tensors(self, key: str) -> dict[str, torch.Tensor]:
        """Every block of `key` as named tensors [nodes, *shape] (a copy for host/disk tiers); for small banks."""
        return self.formats[key].named(self.read_rows(key).params)

    def iter_blocks(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        for key in self.formats:
            for name, t in self.named_tensors(key).items():
                yield key, name, t

    def steps_of(self, key: str) -> torch.Tensor:
        self._materialize()
        return self.levels[key].steps

    def bytes_by_key(self) -> dict[str, int]:
        return {k: self.nodes(k) * fmt.param_bytes for k, fmt in self.formats.items()}

    def bytes_by_tier(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for key, fmt in self.formats.items():
            t = out.setdefault(self.tiers[key], {"param_bytes": 0, "state_bytes": 0})
            t["param_bytes"] += self.nodes(key) * fmt.param_bytes
            t["state_bytes"] += self.nodes(key) * (fmt.m_bytes + fmt.v_bytes)
        return out

    def held_params(self) -> int:
        return sum(self.nodes(k) * f.numel for k, f in self.formats.items() if k != GENERIC)

    def fill(self, value: float = 0.0) -> None:
        """Set every block's values to `value`: memory committed and level files written without drawing random
        values (benchmarks, where the values do not change the cost). Optimizer state is left empty."""
        self._materialize()
        for key, level in self.levels.items():
            fmt = level.fmt
            if isinstance(level, DeviceLevel):
                level.storage.params.fill_(value)
                continue
            if isinstance(level, PipelinedLevel) and isinstance(level.storage, TensorStorage):
                level.invalidate()
                level.storage.params.fill_(value)
                continue
            # the disk tier: one record buffer written over and over, its checksum computed once
            level.invalidate()
            storage = level.storage
            rows_per = max(1, CHUNK_BYTES // fmt.param_span)
            rec = storage._buffer(min(rows_per, level.nodes), fmt.param_span)
            rec.zero_()
            fmt.params(rec).fill_(value)
            no_state = torch.zeros(rec.shape[0], dtype=torch.bool)
            sums = fmt.checksums(rec[:1], no_state[:1]).expand(rec.shape[0], 2)
            level.state_rows[:] = False
            for a in range(0, level.nodes, rows_per):
                n = min(level.nodes, a + rows_per) - a
                storage.write(torch.arange(a, a + n), rec[:n], no_state[:n], sums[:n], nbytes=fmt.param_bytes)
        if self.cache is not None:
            self.cache = _BlockCache(self.cache.capacity)

    # ---------------------------------------------------------------- flat state (small banks, per-rank files)
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict of blocks and optimizer state (per-rank checkpoint files, tests)."""
        self._materialize()
        out: dict[str, torch.Tensor] = {}
        for key, level in self.levels.items():
            level.flush()
            batch = level.read_range(0, level.nodes, True)
            out[f"{key}.blocks"] = batch.params.detach().cpu().clone()
            out[f"{key}.exp_avg"] = batch.m.detach().cpu().clone()
            out[f"{key}.exp_avg_sq"] = batch.v.detach().cpu().clone()
            out[f"{key}.state_rows"] = level.state_rows.clone()
            out[f"{key}.steps"] = level.steps.detach().cpu().clone()
        for key, rows in self.held.items():
            out[f"{key}.held_rows"] = rows
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._materialize()
        for key in self.formats:
            mine, theirs = self.held.get(key), state.get(f"{key}.held_rows")
            if (mine is None) != (theirs is None) or (mine is not None and not torch.equal(mine, theirs.cpu())):
                raise ValueError(f"bank state of `{key}` holds other blocks than this store (it was saved by a run "
                                 "with another trainer.data_parallel, world size or subtree plan)")
        for key, level in self.levels.items():
            fmt = level.fmt
            want = {"blocks": (level.nodes, fmt.numel), "exp_avg": (level.nodes, fmt.numel),
                    "exp_avg_sq": (level.nodes, fmt.v_numel), "steps": (level.nodes,), "state_rows": (level.nodes,)}
            for name, shape in want.items():
                src = state.get(f"{key}.{name}")
                if src is None or tuple(src.shape) != shape:
                    raise ValueError(f"bank state is missing `{key}.{name}` or has the wrong shape (expected {shape}, "
                                     f"got {None if src is None else tuple(src.shape)}); was it saved with another "
                                     "memory.optim_state or bank layout?")
            level.write_range(0, RowBatch(state[f"{key}.blocks"].to(fmt.dtype), state[f"{key}.exp_avg"].to(fmt.m_dtype),
                                          state[f"{key}.exp_avg_sq"].to(fmt.v_dtype)))
            level.state_rows = state[f"{key}.state_rows"].bool().clone()
            level.set_steps(state[f"{key}.steps"])
        if self.cache is not None:
            self.cache = _BlockCache(self.cache.capacity)

    # ---------------------------------------------------------------- model directory (export)
    def _chunks(self, level: Level) -> Iterator[tuple[int, int]]:
        rows_per = max(1, CHUNK_BYTES // max(1, level.fmt.param_bytes))
        for a in range(0, level.nodes, rows_per):
            yield a, min(level.nodes, a + rows_per)

    def save(self, directory: Path) -> dict[str, dict]:
        """One safetensors file per bank key: `blocks` [nodes, P] (rows, node axis first), `checksum` [nodes] (per
        block, computed while writing, verified while reading), `steps` [nodes] (updates per block, for inspect).
        Returns file name -> {bytes, sha256 of everything but the blocks} for model.json."""
        self._materialize()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        out = {}
        for key, level in self.levels.items():
            level.flush()
            fmt = level.fmt
            sums = torch.zeros(level.nodes, dtype=torch.int64)

            def blocks(level=level, fmt=fmt, sums=sums):
                for a, b in self._chunks(level):
                    rows = level.read_range(a, b, False).params
                    buf = rows.contiguous().view(torch.uint8).view(b - a, fmt.param_bytes)
                    sums[a:b] = checksums_via(self.compute_device, fmt, buf, params_only=True)
                    yield rows.cpu()

            meta = {"format": BANK_FILE_FORMAT, "key": key, "dtype": DTYPE_NAMES[fmt.dtype],
                    "pieces": json.dumps([[p.name, list(p.shape)] for p in fmt.pieces]), "tier": level.tier}
            path = directory / f"{key}.safetensors"
            size = write_streamed(path, [
                ("blocks", fmt.dtype, (level.nodes, fmt.numel), blocks),
                ("checksum", torch.int64, (level.nodes,), lambda sums=sums: iter([sums])),
                ("steps", torch.int64, (level.nodes,), lambda level=level: iter([level.steps.detach().cpu()])),
            ], meta)
            out[path.name] = {"bytes": size, "frame_sha256": frame_digest(path)}
        return out

    def load(self, directory: Path, *, digests: dict[str, dict] | None = None) -> None:
        """Fill the store from a model directory's bank files (the format `save` writes, or the per-tensor format 1).

        Every block is checked against its checksum while it is read (disk-tier levels: whenever a block is fetched).
        `digests` (model.json) also ties each file's checksum table to the export that wrote it.
        """
        self._materialize()
        directory = Path(directory)
        for key, level in list(self.levels.items()):
            fmt = level.fmt
            path = directory / f"{key}.safetensors"
            if not path.is_file():
                raise BankFileError(f"{path}: bank file missing (expected one file per bank key: "
                                    f"{', '.join(k + '.safetensors' for k in self.levels)})")
            try:
                header, start = read_header(path)
            except SafetensorsError as exc:
                raise BankFileError(str(exc)) from None
            if (header.get("__metadata__") or {}).get("format") != BANK_FILE_FORMAT:
                if digests and path.name in digests:  # a per-tensor file has no block checksums to verify
                    raise BankFileError(f"{path}: not the bank file model.json recorded (a per-tensor file of an "
                                        "older export in its place, or a damaged header)")
                self._load_per_tensor(key, level, path, header)
                continue
            dtype, shape, a0, b0 = tensor_slice(header, "blocks", path)
            if tuple(shape) != (level.nodes, fmt.numel) or dtype != fmt.dtype:
                raise BankFileError(f"{path}: `blocks` is {dtype} {tuple(shape)}, this bank expects {fmt.dtype} "
                                    f"{(level.nodes, fmt.numel)} (a model of another shape or memory.dtype)")
            if digests and path.name in digests:
                want = digests[path.name]
                if path.stat().st_size != want["bytes"] or frame_digest(path) != want["frame_sha256"]:
                    raise BankFileError(f"{path}: size, header or checksum table differ from what model.json "
                                        "recorded (a corrupt file, or a bank file of another export)")
            if path.stat().st_size < start + b0:
                raise BankFileError(f"{path}: truncated ({path.stat().st_size} bytes, expected {start + b0})")
            sums = read_tensor(path, header, start, "checksum")
            steps = read_tensor(path, header, start, "steps") if "steps" in header else None
            if level.tier == "disk":
                level.close()
                storage = FileStorage(fmt, level.nodes, path, key=key, create=False, threads=self.io_threads,
                                      io_factory=self.disk_io_factory(), pin=self.compute_device.type == "cuda",
                                      exported=(start + a0, fmt.param_bytes))
                storage.checksums[:, 0] = sums
                storage.checksum_device = self.compute_device
                level = self.levels[key] = PipelinedLevel(key, fmt, level.nodes, self.compute_device, storage, "disk")
            else:
                io = ThreadPoolBlockIO(path, base=start + a0, stride=fmt.param_bytes, writable=False,
                                       threads=self.io_threads, direct=False)
                cuda = level.tier == "device" and self.compute_device.type == "cuda"
                try:
                    for a, b in self._chunks(level):
                        buf = torch.empty((b - a, fmt.param_bytes), dtype=torch.uint8, pin_memory=cuda)
                        io.read_range(a, buf)
                        if cuda:  # checksummed where the rows land
                            buf = buf.to(self.compute_device, non_blocking=True)
                        bad = checksums_via(self.compute_device, fmt, buf, params_only=True) != sums[a:b]
                        if bool(bad.any()):
                            rows = (torch.nonzero(bad).squeeze(1) + a)[:5].tolist()
                            raise BankFileError(f"{path}: blocks {rows} fail their checksum (corrupt or modified "
                                                "file); re-export the model")
                        level.write_range(a, RowBatch(buf.view(fmt.dtype).view(b - a, fmt.numel)))
                finally:
                    io.close()
            if steps is not None:
                level.set_steps(steps)
        if self.cache is not None:
            self.cache = _BlockCache(self.cache.capacity)

    def _load_per_tensor(self, key: str, level: Level, path: Path, header: dict) -> None:
        """Model format 1: one tensor per name, node axis first."""
        from safetensors import safe_open

        fmt = level.fmt
        with safe_open(str(path), framework="pt") as f:
            for p in fmt.pieces:
                if p.name not in f.keys() or tuple(f.get_slice(p.name).get_shape()) != (level.nodes, *p.shape):
                    raise BankFileError(f"{path}: tensor `{p.name}` missing or of the wrong shape "
                                        f"(expected {(level.nodes, *p.shape)})")
            for a, b in self._chunks(level):
                level.write_range(a, RowBatch(fmt.flatten({p.name: f.get_slice(p.name)[a:b] for p in fmt.pieces})
                                              .to(fmt.dtype)))

    # ---------------------------------------------------------------- training checkpoints
    def save_checkpoint(self, directory: Path, step: int) -> dict:
        """The bank as it is after `step`, beside a training checkpoint; returns the manifest to keep in it.

        Device and host levels are copied to `<directory>/<key>.level` (records with their optimizer state) with a
        metadata file of checksums and step counts. A disk level is not copied: its file is flushed, its metadata
        written, and copy-on-write begins (levelfile.py), so the checkpoint costs only the rows later overwritten.
        Calling it again for the same step without an update in between returns the same manifest.
        """
        self._materialize()
        directory = Path(directory)
        if self._snapshot is not None and self._snapshot[:2] == (str(directory), step) \
                and self._snapshot[2].get("updates") == self._steps_taken:
            return self._snapshot[2]["manifest"]
        directory.mkdir(parents=True, exist_ok=True)
        keys = {}
        for key, level in self.levels.items():
            level.flush()
            meta_path = directory / f"{key}.meta.safetensors"
            info = {"tier": level.tier, "nodes": level.nodes, "layout": level.fmt.describe()}
            if level.tier == "disk":
                storage = level.storage
                storage.snapshot(step)
                write_meta(meta_path, key=key, file_id=storage.file_id, checksums=storage.checksums,
                           state_rows=level.state_rows, steps=level.steps, extra={"step": step})
                info.update(file_id=storage.file_id, file=str(storage.path))
            else:
                file_id, checksums = self._write_level_copy(level, directory / f"{key}.level")
                write_meta(meta_path, key=key, file_id=file_id, checksums=checksums, state_rows=level.state_rows,
                           steps=level.steps, extra={"step": step})
                info.update(file_id=file_id, file=f"{key}.level")
            keys[key] = info
        manifest = {"format": 1, "step": step, "keys": keys}
        write_json(directory / "bank.json", manifest)
        fsync_dir(directory)
        self._snapshot = (str(directory), step, {"manifest": manifest, "updates": self._steps_taken})
        return manifest

    def _write_level_copy(self, level: Level, path: Path) -> tuple[str, torch.Tensor]:
        fmt = level.fmt
        file_id = new_file_id()
        tmp = path.with_name(f".{path.name}.tmp")
        create_level_file(tmp, level.key, fmt, level.nodes, file_id, "snapshot")
        checksums = torch.zeros((level.nodes, 2), dtype=torch.int64)
        io = ThreadPoolBlockIO(tmp, base=HEADER, stride=fmt.stride, writable=True, threads=self.io_threads)
        try:
            rows_per = max(1, CHUNK_BYTES // fmt.stride)
            for a in range(0, level.nodes, rows_per):
                b = min(level.nodes, a + rows_per)
                mask = level.state_rows[a:b]
                if bool(mask.any()):
                    rec = pack_records(fmt, level.read_range(a, b, True))
                else:   # no optimizer state in this chunk yet: the values alone
                    values = level.read_range(a, b, False).params
                    rec = torch.zeros((b - a, fmt.param_span), dtype=torch.uint8, device=values.device)
                    fmt.params(rec).copy_(values)
                checksums[a:b] = checksums_via(self.compute_device, fmt, rec, mask)
                rec = rec.cpu()
                with_state = torch.nonzero(mask).squeeze(1)
                without = torch.nonzero(~mask).squeeze(1)
                if len(with_state):   # rows without optimizer state stay sparse holes after their values
                    io.write_rows((with_state + a).tolist(), rec[with_state], fmt.record_bytes)
                if len(without):
                    io.write_rows((without + a).tolist(), rec[without], fmt.param_bytes)
            io.flush()
        finally:
            io.close()
        tmp.replace(path)
        return file_id, checksums

    def load_checkpoint(self, directory: Path, manifest: dict) -> None:
        """Restore the bank saved by `save_checkpoint(directory, step)`; refuses torn or foreign files."""
        self._materialize()
        directory = Path(directory)
        step = int(manifest["step"])
        if set(manifest["keys"]) != set(self.levels):
            raise BankFileError(f"{directory}: bank checkpoint of keys {sorted(manifest['keys'])}, this bank has "
                                f"{sorted(self.levels)} (another memory layout)")
        for key, level in list(self.levels.items()):
            info = manifest["keys"][key]
            fmt = level.fmt
            if info["nodes"] != level.nodes or info["layout"] != json.loads(json.dumps(fmt.describe())):
                raise BankFileError(f"{directory}: bank checkpoint of `{key}` has another layout ({info['layout']}, "
                                    f"{info['nodes']} rows); this run: {fmt.describe()}, {level.nodes} rows")
            meta = read_meta(directory / f"{key}.meta.safetensors", key, level.nodes)
            if (info["tier"] == "disk") != (level.tier == "disk"):
                raise BankFileError(f"{directory}: the checkpoint holds `{key}` on the {info['tier']} tier, this run "
                                    f"plans {level.tier}; resume with the checkpoint's tiers (memory.tiers)")
            if info["tier"] == "disk":
                level = self._restore_disk(key, level, directory, step, meta)
            else:
                self._read_level_copy(level, directory / info["file"], info["file_id"], meta)
            level.state_rows = meta["state_rows"].clone()
            if isinstance(level, DeviceLevel) and level.storage.m is not None:
                # dense device state: rows without state in the checkpoint must not keep what they held before
                fresh = (~level.state_rows).to(level.storage.device)
                level.storage.m[fresh] = 0
                level.storage.v[fresh] = 0
            level.set_steps(meta["steps"])
        self._snapshot = (str(directory), step, {"manifest": manifest, "updates": self._steps_taken})
        if self.cache is not None:
            self.cache = _BlockCache(self.cache.capacity)

    def _read_level_copy(self, level: Level, path: Path, file_id: str, meta: dict) -> None:
        fmt = level.fmt
        check_level_file(path, level.key, fmt, level.nodes, file_id)
        io = ThreadPoolBlockIO(path, base=HEADER, stride=fmt.stride, writable=False, threads=self.io_threads)
        try:
            rows_per = max(1, CHUNK_BYTES // fmt.stride)
            for a in range(0, level.nodes, rows_per):
                b = min(level.nodes, a + rows_per)
                mask = meta["state_rows"][a:b]
                with_state = bool(mask.any())
                if with_state:
                    rec = aligned_empty(b - a, fmt.stride)
                    io.read_range(a, rec)
                    rec[~mask, fmt.m_offset:] = 0
                else:   # values only (rows never updated have no state in the copy)
                    rec = aligned_empty(b - a, fmt.param_span)
                    io.read_rows(range(a, b), rec, fmt.param_bytes)
                bad = (checksums_via(self.compute_device, fmt, rec, mask) != meta["checksums"][a:b]).any(1)
                if bool(bad.any()):
                    rows = (torch.nonzero(bad).squeeze(1) + a)[:5].tolist()
                    raise BankFileError(f"{path}: rows {rows} fail their checksum (a torn or corrupt checkpoint "
                                        "file); resume from an earlier checkpoint")
                level.write_range(a, RowBatch.of_record(fmt, rec, with_state))
        finally:
            io.close()

    def _restore_disk(self, key: str, level: Level, directory: Path, step: int, meta: dict) -> Level:
        if isinstance(level, _PendingDisk):
            raise BankFileError(f"{self.disk_dir / (key + '.level')}: the disk tier's level file is missing; the "
                                "checkpoint can only be resumed with it (it is updated in place, not copied)")
        storage = level.storage
        if storage.file_id != meta["file_id"]:
            raise BankFileError(f"{storage.path}: level file id {storage.file_id} is not the one the checkpoint in "
                                f"{directory} was taken of ({meta['file_id']}): the file was replaced")
        root = directory.parent
        tables = {}
        for d in root.glob("step-*"):
            mp = d / f"{key}.meta.safetensors"
            if mp.is_file():
                s = int(d.name.split("-", 1)[1])
                if s >= step:
                    tables[s] = meta if s == step else read_meta(mp, key, level.nodes)
        tables[step] = meta
        level.invalidate()
        storage.restore(step, tables)
        return level


def frame_digest(path: Path) -> str:
    """sha256 of a bank file's header and of the tensors after `blocks` (checksums, steps): with the per-block
    checksums, this covers every byte of the file without reading the blocks twice."""
    import hashlib

    header, start = read_header(path)
    _, _, _, end_blocks = tensor_slice(header, "blocks", path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(start))
        f.seek(start + end_blocks)
        h.update(f.read())
    return h.hexdigest()


class _PendingDisk(Level):
    """A disk level whose file is not attached yet (an inference load attaches the model directory's)."""

    tier = "disk"

    def fetch(self, rows: torch.Tensor, with_state: bool) -> RowBatch:
        raise BankFileError(f"bank level {self.key} is on the disk tier but has no file yet: load a model directory "
                            "or a checkpoint first")

    store = read_range = write_range = fetch  # type: ignore[assignment]

    def invalidate(self) -> None:
        pass


class DeviceStore(TieredStore):
    """Every level (blocks and optimizer state) on the compute device (`memory.store: device`)."""

    forced_tier = "device"


class HostStore(TieredStore):
    """Every level in host RAM, fetched blocks staged to the device (`memory.store: host`)."""

    forced_tier = "host"


# the name older code and plugins import
BlockStore = TieredStore

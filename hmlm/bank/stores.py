"""Bank stores: where the memory blocks live, how a batch's blocks are fetched, and how they are updated.

The bank is *not* an nn.Module: Lightning/DDP/DeepSpeed never see it, so they neither all-reduce nor ZeRO-shard a
multi-billion bank that is read a few blocks at a time (DESIGN.md §5). Each step:

    fetch(paths)   gathers, per level, the unique blocks of the batch into fresh leaf tensors on the compute device,
                   then expands them to per-sample tensors (concatenated over levels along the rank axis);
    backward       fills the leaves' .grad (summed over the samples sharing a block);
    step(...)      clips the memory gradient separately from the anchor's, then runs lazy block-wise AdamW on exactly
                   the fetched rows (hmlm.bank.lazy_adamw).

Tiers: `device` keeps everything on the compute device; `host` keeps blocks and optimizer state in (pinned) CPU RAM
and moves only the fetched blocks. A bank key is `l{level}` for a tree level or `generic` for the context-free control.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from .lazy_adamw import lazy_adamw_update
from .layout import BankLayout

GENERIC = "generic"


class BlockStore:
    tier = "device"

    def __init__(self, layout: BankLayout, *, generic: bool = True, dtype: torch.dtype = torch.float32,
                 seed: int = 0, init: bool = True):
        self.layout = layout
        self.dtype = dtype
        self.compute_device = torch.device("cpu")
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        for lvl in layout.active_levels:
            self.tensors[f"l{lvl}"] = self._new_blocks(layout.nodes(lvl), layout.sizes[lvl], seed * 1000 + lvl, init)
        if generic and layout.total_rank > 0:
            self.tensors[GENERIC] = self._new_blocks(1, layout.total_rank, seed * 1000 + 999, init)
        # optimizer state, allocated on first step so that inference-only loads stay light
        self.exp_avg: dict[str, dict[str, torch.Tensor]] = {}
        self.exp_avg_sq: dict[str, dict[str, torch.Tensor]] = {}
        self.steps: dict[str, torch.Tensor] = {}
        self._fetched: list[tuple[str, torch.Tensor, dict[str, torch.Tensor]]] = []
        # subtree-parallel ranks hold only some rows per key (`restrict`): their global node ids, sorted, and the
        # global -> local row lookup (-1 = not held). Empty = every row is held.
        self.held: dict[str, torch.Tensor] = {}
        self._local: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- construction and placement
    def _new_blocks(self, nodes: int, r: int, seed: int, init: bool) -> dict[str, torch.Tensor]:
        spec = self.layout.spec(r)
        blocks = {name: torch.zeros((nodes, *s.shape), dtype=torch.float32) for name, s in spec.items()}
        if init:
            gen = torch.Generator().manual_seed(seed)
            self.layout.memory.init_block(blocks, gen)
        return {name: t.to(self.dtype) for name, t in blocks.items()}

    @property
    def has_generic(self) -> bool:
        return GENERIC in self.tensors

    def storage_device(self) -> torch.device:
        return self.compute_device

    def to_compute(self, device: torch.device | str) -> "BlockStore":
        """Place the store for training/inference on `device` (the anchor's device)."""
        self.compute_device = torch.device(device)
        self._move_all(self.storage_device(), pin=False)
        return self

    def _move_all(self, device: torch.device, pin: bool) -> None:
        for group in (self.tensors, self.exp_avg, self.exp_avg_sq):
            for key, d in group.items():
                for name, t in d.items():
                    t = t.to(device)
                    d[name] = t.pin_memory() if pin and not t.is_pinned() else t
        self.steps = {k: v.to(device) for k, v in self.steps.items()}

    # ---------------------------------------------------------------- fetch
    def fetch(self, paths: torch.Tensor, *, generic_mask: torch.Tensor | None = None,
              grad: bool = False) -> dict[str, torch.Tensor]:
        """Per-sample memory tensors [B, *spec(R)] for paths [B, levels] (global node id per level).

        Samples with generic_mask[i] get the generic block instead of their path's blocks (same size). With
        grad=True the gathered blocks are leaves whose gradients `step` applies.
        """
        paths = paths.detach().to("cpu", torch.long)
        batch = paths.shape[0]
        if generic_mask is None:
            generic_mask = torch.zeros(batch, dtype=torch.bool)
        generic_mask = generic_mask.detach().to("cpu", torch.bool)
        if generic_mask.any() and not self.has_generic:
            raise ValueError("generic memory requested, but this bank was built without a generic block "
                             "(memory.generic=false)")
        spec = self.layout.spec(self.layout.total_rank)
        if paths.shape[1] < len(self.layout.sizes):
            raise ValueError(f"paths have {paths.shape[1]} levels, the bank has {len(self.layout.sizes)}")
        self._fetched = [] if grad else self._fetched
        pieces: dict[str, list[torch.Tensor]] = {name: [] for name in spec}
        path_rows = (~generic_mask).nonzero().squeeze(1)
        generic_rows = generic_mask.nonzero().squeeze(1)
        if len(path_rows):
            per_level: dict[str, list[torch.Tensor]] = {name: [] for name in spec}
            for lvl in self.layout.active_levels:
                nodes = paths[path_rows, lvl]
                if nodes.min() < 0 or nodes.max() >= self.layout.nodes(lvl):
                    raise ValueError(f"level-{lvl + 1} node ids must be in [0, {self.layout.nodes(lvl)}), "
                                     f"got {nodes.min().item()}..{nodes.max().item()}")
                unique, inverse = torch.unique(nodes, return_inverse=True)
                leaf = self._gather(f"l{lvl}", unique, grad)
                inverse = inverse.to(self.compute_device)
                for name in spec:
                    per_level[name].append(leaf[name].index_select(0, inverse))
            for name, s in spec.items():
                pieces[name].append(torch.cat(per_level[name], dim=1 + s.rank_axis))
        if len(generic_rows):
            leaf = self._gather(GENERIC, torch.zeros(1, dtype=torch.long), grad)
            for name in spec:
                pieces[name].append(leaf[name].expand(len(generic_rows), *leaf[name].shape[1:]))
        order = torch.cat([path_rows, generic_rows])
        restore = torch.argsort(order).to(self.compute_device)
        return {name: torch.cat(parts).index_select(0, restore) for name, parts in pieces.items()}

    def restrict(self, held: dict[str, "torch.Tensor | list[int]"]) -> None:
        """Keep only the given rows (global node ids) of each key, e.g. the blocks a subtree-parallel rank owns.

        Fetching a row that is not held is an error; `_fetched` and the optimizer state then use local row numbers.
        """
        if self.held:
            raise RuntimeError("this store is already restricted to a subset of its blocks")
        for key, rows in held.items():
            rows = torch.as_tensor(rows, dtype=torch.long).unique()
            nodes = next(iter(self.tensors[key].values())).shape[0]
            if len(rows) and (rows.min() < 0 or rows.max() >= nodes):
                raise ValueError(f"bank key {key}: held rows must be in [0, {nodes})")
            for group in (self.tensors, self.exp_avg, self.exp_avg_sq):
                if key in group:
                    group[key] = {n: t.index_select(0, rows.to(t.device)) for n, t in group[key].items()}
            if key in self.steps:
                self.steps[key] = self.steps[key].index_select(0, rows.to(self.steps[key].device))
            local = torch.full((nodes,), -1, dtype=torch.long)
            local[rows] = torch.arange(len(rows))
            self.held[key], self._local[key] = rows, local

    def local_rows(self, key: str, rows) -> "torch.Tensor":
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

    def _gather(self, key: str, rows: torch.Tensor, grad: bool) -> dict[str, torch.Tensor]:
        if key in self._local:
            rows = self.local_rows(key, rows)
        src = self.tensors[key]
        idx = rows.to(self.storage_device())
        leaf = {}
        for name, t in src.items():
            blk = t.index_select(0, idx)
            blk = blk.to(self.compute_device, dtype=torch.float32, non_blocking=True)
            leaf[name] = blk.requires_grad_(grad)
        if grad:
            self._fetched.append((key, rows, leaf))
        return leaf

    # ---------------------------------------------------------------- update
    def fetched_grad_norm(self) -> torch.Tensor:
        sq = [t.grad.float().pow(2).sum() for _, _, leaf in self._fetched for t in leaf.values() if t.grad is not None]
        return torch.stack(sq).sum().sqrt() if sq else torch.zeros(())

    @torch.no_grad()
    def step(self, *, lr: float, weight_decay: float, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
             grad_clip: float = 0.0, grad_norm: torch.Tensor | None = None) -> dict[str, float]:
        """Apply lazy AdamW to the blocks fetched (with grad=True) since the last step; returns stats.

        `grad_norm` overrides the norm used for clipping (a subtree-parallel run passes the norm over all ranks).
        """
        norm = self.fetched_grad_norm() if grad_norm is None else grad_norm
        scale = 1.0
        if grad_clip > 0 and float(norm) > grad_clip:
            scale = grad_clip / (float(norm) + 1e-6)
        updated = 0
        for key, rows, leaf in self._fetched:
            self._ensure_state(key)
            first = True
            for name, t in leaf.items():
                if t.grad is None:
                    continue
                lazy_adamw_update(self.tensors[key][name], self.exp_avg[key][name], self.exp_avg_sq[key][name],
                                  self.steps[key], rows, t.grad * scale if scale != 1.0 else t.grad, lr=lr,
                                  beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, advance_steps=first,
                                  compute_device=self.compute_device)
                first = False
            updated += 0 if first else len(rows)
        self._fetched = []
        return {"grad_norm": float(norm), "blocks_updated": float(updated)}

    def discard_fetched(self) -> None:
        self._fetched = []

    def _ensure_state(self, key: str) -> None:
        if key in self.exp_avg:
            return
        dev = self.storage_device()
        self.exp_avg[key] = {n: torch.zeros(t.shape, dtype=torch.float32, device=dev) for n, t in self.tensors[key].items()}
        self.exp_avg_sq[key] = {n: torch.zeros(t.shape, dtype=torch.float32, device=dev) for n, t in self.tensors[key].items()}
        self.steps[key] = torch.zeros(next(iter(self.tensors[key].values())).shape[0], dtype=torch.long, device=dev)
        if self.tier == "host":
            self._move_all(dev, pin=torch.cuda.is_available())

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict of blocks and optimizer state (for training checkpoints)."""
        out: dict[str, torch.Tensor] = {}
        for key, d in self.tensors.items():
            for name, t in d.items():
                out[f"{key}.{name}"] = t
        for key in self.exp_avg:
            for name in self.exp_avg[key]:
                out[f"{key}.{name}.exp_avg"] = self.exp_avg[key][name]
                out[f"{key}.{name}.exp_avg_sq"] = self.exp_avg_sq[key][name]
            out[f"{key}.steps"] = self.steps[key]
        for key, rows in self.held.items():
            out[f"{key}.held_rows"] = rows
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        dev = self.storage_device()
        for key in self.tensors:
            mine, theirs = self.held.get(key), state.get(f"{key}.held_rows")
            if (mine is None) != (theirs is None) or (mine is not None and not torch.equal(mine, theirs.cpu())):
                raise ValueError(f"bank state of `{key}` holds other blocks than this store (it was saved by a run "
                                 "with another trainer.data_parallel, world size or subtree plan)")
        for key, d in self.tensors.items():
            for name, t in d.items():
                src = state.get(f"{key}.{name}")
                if src is None or tuple(src.shape) != tuple(t.shape):
                    raise ValueError(f"bank state is missing `{key}.{name}` or has the wrong shape "
                                     f"(expected {tuple(t.shape)}, got {None if src is None else tuple(src.shape)})")
                d[name] = src.to(device=dev, dtype=self.dtype).clone()
            if f"{key}.steps" in state:
                self.exp_avg[key] = {n: state[f"{key}.{n}.exp_avg"].to(dev).clone() for n in d}
                self.exp_avg_sq[key] = {n: state[f"{key}.{n}.exp_avg_sq"].to(dev).clone() for n in d}
                self.steps[key] = state[f"{key}.steps"].to(dev).clone()
        if self.tier == "host":
            self._move_all(dev, pin=torch.cuda.is_available())

    def save(self, directory: Path) -> dict[str, str]:
        """Write one block-addressable safetensors file per bank key (node axis first); returns file -> sha256."""
        from ..utils import atomic_write_path, sha256_file

        directory.mkdir(parents=True, exist_ok=True)
        sums = {}
        for key, d in self.tensors.items():
            path = directory / f"{key}.safetensors"
            with atomic_write_path(path) as tmp:
                save_file({n: t.detach().cpu().contiguous() for n, t in d.items()}, str(tmp),
                          metadata={"key": key, "dtype": str(self.dtype)})
            sums[path.name] = sha256_file(path)
        return sums

    def load(self, directory: Path) -> None:
        for key, d in self.tensors.items():
            path = directory / f"{key}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: bank file missing (expected one file per bank key: "
                                        f"{', '.join(k + '.safetensors' for k in self.tensors)})")
            loaded = load_file(str(path))
            for name, t in d.items():
                if name not in loaded or tuple(loaded[name].shape) != tuple(t.shape):
                    raise ValueError(f"{path}: tensor `{name}` missing or of the wrong shape (expected {tuple(t.shape)})")
                d[name] = loaded[name].to(device=self.storage_device(), dtype=self.dtype)
        if self.tier == "host":
            self._move_all(self.storage_device(), pin=torch.cuda.is_available())

    def bytes_by_key(self) -> dict[str, int]:
        return {k: sum(t.numel() * t.element_size() for t in d.values()) for k, d in self.tensors.items()}

    def iter_blocks(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        for key, d in self.tensors.items():
            for name, t in d.items():
                yield key, name, t


class DeviceStore(BlockStore):
    """Blocks and optimizer state on the compute device (fast; the bank must fit in accelerator memory)."""

    tier = "device"


class HostStore(BlockStore):
    """Blocks and optimizer state in (pinned, when CUDA is present) CPU RAM; only fetched blocks travel."""

    tier = "host"

    def storage_device(self) -> torch.device:
        return torch.device("cpu")

    def to_compute(self, device: torch.device | str) -> "BlockStore":
        self.compute_device = torch.device(device)
        self._move_all(torch.device("cpu"), pin=self.compute_device.type == "cuda")
        return self


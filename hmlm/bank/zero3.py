"""`memory.store: zero3`: the naive baseline of the bank benchmark -- the bank as ordinary parameters under DeepSpeed
ZeRO-3 with CPU (or NVMe) offload of the parameters and the optimizer.

One nn.Parameter per bank key ([nodes, P] rows, memory.dtype) in a small module that a DeepSpeed engine of its own
wraps (the anchor keeps its optimizer; this engine sees only the bank). A fetch runs the engine's forward: ZeRO-3
gathers each *whole* level to the compute device and the batch's rows are index_select-ed from it; backward produces
a dense [nodes, P] gradient per level, which ZeRO reduces and moves to the host; `step` runs DeepSpeed's AdamW (CPU
Adam) over *every* parameter. That is what "the bank as a ZeRO-3 parameter" costs, and what the tiered store (lazy
rows, prefetch, per-row state) is measured against (`hmlm bench train --stores zero3`).

Differences from the tiered store, by construction: AdamW is dense (rows not fetched still get weight decay, and every
row's bias correction follows the global step); on a step where every row of every level is fetched the update is the
same (tests/test_bank_ds.py). Bank values are drawn exactly as the tiered store draws them. This store is a benchmark
baseline: it does not write training checkpoints (`save_checkpoint` refuses, naming the key); `save` (the model
directory's bank files) works.

Options (`memory.store_options`): offload_param / offload_optimizer: cpu | nvme | none; nvme_path (default
memory.disk_dir) for nvme offload, which needs DeepSpeed's async I/O op (hmlm/bank/dsops.py).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .layout import BankLayout
from .levelfile import BankFileError
from .levels import DeviceLevel, Level, RowBatch
from .stores import TieredStore

OFFLOAD = ("cpu", "nvme", "none")


@dataclass
class Zero3Options:
    offload_param: str = "cpu"        # where ZeRO-3 keeps the bank between steps: cpu | nvme | none (the device)
    offload_optimizer: str = "cpu"    # where the AdamW state lives and steps: cpu (DeepSpeed CPU Adam) | nvme | none
    nvme_path: str = ""               # folder for nvme offload ('' = memory.disk_dir)

    def __post_init__(self):
        for key in ("offload_param", "offload_optimizer"):
            if getattr(self, key) not in OFFLOAD:
                raise ValueError(f"{key}: {getattr(self, key)!r}; expected one of {', '.join(OFFLOAD)}")


class _Bank(nn.Module):
    """The bank as parameters; forward(requests) -> the requested rows of each key."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.rows = nn.ParameterDict({key: nn.Parameter(t, requires_grad=True) for key, t in tensors.items()})

    def forward(self, requests: Sequence[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        out = []
        for key, rows in requests:
            p = self.rows[key]
            out.append(p.index_select(0, rows.to(p.device)).to(torch.float32))
        return out


class _Zero3Level(Level):
    """A key of the zero3 store, read and written through ZeRO-3's gather (tools, export; never the training path)."""

    tier = "zero3"

    def __init__(self, key, fmt, nodes, compute_device, param: nn.Parameter):
        super().__init__(key, fmt, nodes, compute_device)
        self.param = param

    def _gathered(self, modify: bool = False):
        import deepspeed

        return deepspeed.zero.GatheredParameters([self.param], modifier_rank=0 if modify else None)

    def fetch(self, rows: torch.Tensor, with_state: bool) -> RowBatch:
        if with_state:
            raise BankFileError("memory.store=zero3 keeps the AdamW state inside DeepSpeed; it has no per-row state")
        with self._gathered():
            return RowBatch(self.param.data.index_select(0, rows.to(self.param.device)).clone())

    def read_range(self, a: int, b: int, with_state: bool) -> RowBatch:
        return self.fetch(torch.arange(a, b), with_state)

    def write_range(self, a: int, batch: RowBatch) -> None:
        with self._gathered(modify=True):
            self.param.data[a:a + batch.params.shape[0]].copy_(batch.params.to(self.param.device))


def _init_single_process(cuda: bool) -> None:
    """torch.distributed for DeepSpeed in a process that has none yet (the bench, a one-device fit): world of one."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)


class Zero3Store(TieredStore):
    """The bank under DeepSpeed ZeRO-3 (see the module docstring)."""

    Options = Zero3Options

    def __init__(self, layout: BankLayout, *, options: Zero3Options | None = None, **kwargs: Any):
        kwargs.pop("tiers", None)
        super().__init__(layout, **kwargs)
        self.options = options or Zero3Options()
        self.tiers = {key: "zero3" for key in self.formats}
        self.engine = None

    @classmethod
    def from_recipe(cls, layout: BankLayout, memory_cfg: Any, *, seed: int, init: bool,
                    tiers: Sequence[str] | None, training: bool = True,
                    options: Zero3Options | None = None) -> "Zero3Store":
        from .rows import DTYPES

        options = options or Zero3Options()
        if not options.nvme_path:
            options.nvme_path = str(memory_cfg.disk_dir)
        return cls(layout, options=options, generic=memory_cfg.generic, dtype=DTYPES[memory_cfg.dtype], seed=seed,
                   init=init, optim_state=memory_cfg.optim_state, io_threads=memory_cfg.io_threads)

    def ds_config(self) -> dict[str, Any]:
        o = self.options

        def offload(device: str) -> dict[str, Any] | None:
            if device == "none":
                return None
            cfg: dict[str, Any] = {"device": device, "pin_memory": self.compute_device.type == "cuda"}
            if device == "nvme":
                cfg["nvme_path"] = o.nvme_path
            return cfg

        zero: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": 0}
        for key, device in (("offload_param", o.offload_param), ("offload_optimizer", o.offload_optimizer)):
            if offload(device) is not None:
                zero[key] = offload(device)
        return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                # lr, betas, eps and weight decay are set from the recipe at every step
                "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "weight_decay": 0.0}},
                "zero_optimization": zero, "bf16": {"enabled": self.dtype == torch.bfloat16},
                "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30, "wall_clock_breakdown": False}

    def _materialize(self) -> None:
        if self.levels:
            return
        # the values are drawn as the tiered store draws them, into plain tensors that become the parameters
        staging = {key: DeviceLevel(key, fmt, self.nodes(key), torch.device("cpu")) for key, fmt in self.formats.items()}
        self.levels = dict(staging)
        if self.init:
            self._initialise()
        self.init = False
        import deepspeed

        cuda = self.compute_device.type == "cuda"
        _init_single_process(cuda)
        bank = _Bank({key: level.storage.params for key, level in staging.items()})
        if not cuda:
            bank = bank.to(self.compute_device)
        self.engine, _, _, _ = deepspeed.initialize(model=bank, model_parameters=list(bank.parameters()),
                                                    config=self.ds_config(), dist_init_required=False)
        self.levels = {key: _Zero3Level(key, level.fmt, level.nodes, self.compute_device, bank.rows[key])
                       for key, level in staging.items()}

    def _move(self, device: torch.device) -> None:
        raise ValueError("memory.store=zero3: the DeepSpeed engine is built on its first device; build the store "
                         "for the device it trains on")

    def _leaves(self, requests: list[tuple[str, torch.Tensor]], grad: bool, dtype: torch.dtype) -> list[torch.Tensor]:
        # Every call reads every key, in one fixed order (no rows for the keys not requested): ZeRO-3 records the
        # parameters of the first step and expects the same ones at every later step ("tracing error at step 1"
        # when a step's batch drew only the generic block, or no generic block).
        wanted = dict(requests)
        none = torch.zeros(0, dtype=torch.long)
        self.engine.train(grad)
        with torch.set_grad_enabled(grad):
            leaves = self.engine([(key, wanted.get(key, none)) for key in self.formats])
        by_key = dict(zip(self.formats, leaves))
        return [by_key[key] for key, _ in requests]

    def prefetch(self, paths: torch.Tensor, *, with_state: bool = True) -> None:
        """ZeRO-3 gathers whole levels at fetch time; nothing to stage ahead."""

    def fetched_grads(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        return []   # the gradients are DeepSpeed's (partitioned, offloaded)

    def replace_fetched_grads(self, groups) -> None:
        raise ValueError("memory.store=zero3 does not support trainer.data_parallel=subtree")

    def discard_fetched(self) -> None:
        self.engine.zero_grad()

    @torch.no_grad()
    def step(self, *, lr: float, weight_decay: float, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
             grad_clip: float = 0.0, grad_norm: torch.Tensor | None = None) -> dict[str, Any]:
        """DeepSpeed's step: dense AdamW over every bank parameter, clipped by the bank's gradient norm."""
        opt = self.engine.optimizer
        for group in opt.param_groups:
            group.update(lr=lr, weight_decay=weight_decay, betas=(beta1, beta2), eps=eps)
        opt.clip_grad = grad_clip
        self.engine.step()
        self._steps_taken += 1
        norm = self.engine.get_global_grad_norm()
        return {"grad_norm": torch.tensor(float(norm) if norm is not None else float("nan")),
                "blocks_updated": float(sum(self.nodes(k) for k in self.formats))}

    def fill(self, value: float = 0.0) -> None:
        self._materialize()
        for level in self.levels.values():
            level.param.ds_tensor.data.fill_(value)   # each rank's partition (all of it in a world of one)
        for flat in getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", []):
            flat.data.fill_(value)                     # and the optimizer's fp32 master copy of it

    def save_checkpoint(self, directory, step: int) -> dict:
        raise BankFileError("memory.store=zero3 is the benchmark baseline (hmlm bench train --stores zero3); it "
                            "writes no training checkpoints: train with memory.store=tiered")

    def load_checkpoint(self, directory, manifest: dict) -> None:
        self.save_checkpoint(directory, 0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise BankFileError("memory.store=zero3 keeps the bank's optimizer state inside DeepSpeed; it has no flat "
                            "state dict (use memory.store=tiered)")

    def bytes_by_tier(self) -> dict[str, dict[str, int]]:
        return {"zero3": {"param_bytes": sum(self.nodes(k) * f.param_bytes for k, f in self.formats.items()),
                          "state_bytes": sum(self.nodes(k) * f.numel * 12 for k, f in self.formats.items())}}

    def close(self) -> None:
        self.levels = {}
        self.engine = None

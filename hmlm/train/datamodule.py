"""LightningDataModule over an index's packed shards, with a resumable, deterministic sequence order.

The training order is an endless stream: epoch e visits every packed sequence in a permutation seeded by (seed, e).
A position in that stream is just the number of sequences consumed, so resuming from a checkpoint at global step s
restarts the stream at s * batch_size * world_size and the run sees exactly the batches an uninterrupted run would.
Each data-parallel rank takes every world_size-th sequence of the global stream. With trainer.data_parallel=subtree
a rank instead draws from the subtrees it owns (hmlm.train.affine.SubtreeSampler, docs/distributed.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from ..data.packing import SequenceShards


class StreamSampler(Sampler[int]):
    def __init__(self, n: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        if n == 0:
            raise ValueError("the index holds no training sequences: the corpus is too small for data.seq_len")
        self.n, self.seed, self.start, self.rank, self.world = n, seed, start, rank, world

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def __iter__(self) -> Iterator[int]:
        pos = self.start + self.rank  # global stream position of this rank's next sequence
        epoch, perm = -1, None
        while True:
            e, off = divmod(pos, self.n)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            yield int(perm[off])
            pos += self.world


class AnnouncingLoader:
    """A DataLoader that passes each training batch's paths to `announce` as the batch is drawn.

    Lightning draws batch n+1 before it runs step n, so the bank (`store.prefetch`) can stage the next step's blocks
    while the current one computes. The paths stay on the CPU; nothing else about the batch changes.
    """

    def __init__(self, loader: DataLoader, announce):
        self.loader, self.announce = loader, announce

    def __iter__(self):
        for batch in self.loader:
            self.announce(batch["path"])
            yield batch


class ShardDataModule(L.LightningDataModule):
    def __init__(self, index_dir: str | Path, *, batch_size: int, seed: int, num_workers: int = 0,
                 val_batch_size: int | None = None, val: bool = True):
        super().__init__()
        self.with_val = val  # False: the index has no validation split (data.val_fraction=0)
        self.index_dir = Path(index_dir)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: SequenceShards | None = None
        self.val_set: SequenceShards | None = None
        self.subtree_plan = None  # trainer.data_parallel=subtree: set by fit() (hmlm.train.affine.SubtreePlan)
        # batches dropped for a non-finite loss (hmlm.train.guard): they used up stream positions but no global step
        self.skipped_batches = 0
        self.announce = None      # the bank's prefetch hook, set by HMLMModule.setup (AnnouncingLoader)

    def setup(self, stage: str | None = None) -> None:
        shards = self.index_dir / "shards"
        if self.train_set is None:
            self.train_set = SequenceShards(shards, "train")
        if self.val_set is None and self.with_val:
            self.val_set = SequenceShards(shards, "val")

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        rank, world = self._world()
        step = self.trainer.global_step if getattr(self, "trainer", None) is not None else 0
        step += self.skipped_batches
        if self.subtree_plan is not None:
            from .affine import SubtreeSampler

            # a rank draws from its own subtrees; one process reproducing N ranks draws all N batches per step
            ranks = [rank] if world > 1 else list(range(self.subtree_plan.world))
            sampler = SubtreeSampler(self.subtree_plan, self.seed, self.batch_size, ranks=ranks, start_step=step)
            loader = DataLoader(self.train_set, batch_size=self.batch_size * len(ranks), sampler=sampler,
                                drop_last=True, **self._loader_options())
        else:
            sampler = StreamSampler(len(self.train_set), self.seed, start=step * self.batch_size * world,
                                    rank=rank, world=world)
            loader = DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                                **self._loader_options())
        if self.announce is None:
            return loader
        return AnnouncingLoader(loader, self.announce)  # type: ignore[return-value]

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False, **self._loader_options())

    def _loader_options(self) -> dict:
        # pinned host batches make the copy to a GPU asynchronous (the step need not wait for it); no use on CPU
        return dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                    pin_memory=torch.cuda.is_available())

"""The LightningModule: anchor + memory bank trained with two optimizers on their own schedules.

Why manual optimization: the anchor's AdamW runs under the Lightning strategy (DDP / DeepSpeed), while the bank is
updated by the store's lazy block-wise AdamW on exactly the fetched blocks, with its own LR schedule, weight decay and
gradient clipping. Lightning's automatic optimization can't express two independently clipped optimizers.

Exactly one Lightning-wrapped optimizer steps per batch (the anchor's, or in `memory` mode the bank's), so
`trainer.global_step` counts batches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity

from ..config import Recipe
from ..model import MemoryLM
from .schedule import cosine_lr


class BankOptimizer(torch.optim.Optimizer):
    """Adapter that lets Lightning drive the bank's lazy AdamW like any optimizer (lr lives in param_groups)."""

    def __init__(self, module: "HMLMModule"):
        self._module = module
        cfg = module.recipe.optim.memory
        # torch optimizers need one parameter; this placeholder never receives a gradient
        super().__init__([torch.zeros((), requires_grad=True)], {"lr": cfg.lr})
        self.last_stats: dict[str, float] = {}

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if closure is not None:
            with torch.enable_grad():
                closure()
        cfg = self._module.recipe.optim.memory
        store, sync = self._module.model.store, self._module.bank_sync
        # subtree-parallel: scale to the global loss, reduce shared blocks in their owner groups, clip by the global norm
        norm = sync.reduce(store, global_norm=cfg.grad_clip > 0) if sync is not None else None
        self.last_stats = store.step(lr=self.param_groups[0]["lr"], weight_decay=cfg.weight_decay,
                                     beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, grad_clip=cfg.grad_clip,
                                     grad_norm=norm)


class HMLMModule(L.LightningModule):
    def __init__(self, recipe: Recipe, model: MemoryLM):
        super().__init__()
        self.recipe = recipe
        self.model = model
        self.automatic_optimization = False
        mode = recipe.trainer.mode
        self.train_anchor = mode != "memory"
        self.train_memory = mode != "anchor" and model.has_memory
        for p in self.model.anchor.parameters():
            p.requires_grad_(self.train_anchor)
        k = recipe.index.router.branching
        p_generic = recipe.memory.generic_prob
        if p_generic is None:
            p_generic = 1.0 / (k + 1) if self.train_memory and recipe.memory.generic else 0.0
        self.generic_prob = p_generic if (model.store is not None and model.store.has_generic) else 0.0
        self.eval_modes = ("fetched", "generic", "none") if model.has_memory else ("none",)
        if model.has_memory and not model.store.has_generic:
            self.eval_modes = ("fetched", "none")
        self.train_ppl = Perplexity(ignore_index=-100)
        # trainer.data_parallel=subtree (hmlm.train.affine): fit() sets the plan; setup() builds the rank's side
        self.subtree_plan = None
        self.bank_sync = None
        self.comm_counter = None
        self.val_ppl = torch.nn.ModuleDict({m: Perplexity(ignore_index=-100) for m in self.eval_modes})
        self.skip_update = False  # set after backward by hmlm.train.guard (trainer.nonfinite.skip): drop this batch
        # DeepSpeed takes exactly one optimizer (the anchor's): the bank's is then stepped here, outside Lightning
        self.external_bank_optimizer: BankOptimizer | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        if self.model.store is not None:
            # the strategy's device, not self.device: Lightning moves the module only after setup, and the bank's
            # levels are created (and a resume restored) where they will live
            strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
            self.model.store.to_compute(getattr(strategy, "root_device", None) or self.device)
        if self.subtree_plan is not None and self._world()[1] > 1 and self.comm_counter is None:
            from .affine import BankSync, CommCounter

            rank = self._world()[0]
            self.comm_counter = CommCounter()
            if self.model.store is not None:
                # this rank keeps only its own blocks and the shared ones it helps train
                store = self.model.store
                store.restrict({k: torch.from_numpy(v) for k, v in
                                self.subtree_plan.held_rows(rank, store.keys()).items()})
                self.bank_sync = BankSync(self.subtree_plan, store, rank)
                self.bank_sync.counter = self.comm_counter

        self._announce_batches()

    def _announce_batches(self) -> None:
        """Let the bank see each training batch's paths when the loader yields it, one step before the batch is used
        (Lightning draws a batch ahead), so host/disk levels stage its blocks while the current step computes."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "announce") and self.train_memory and self.model.store is not None \
                and hasattr(self.model.store, "prefetch"):
            dm.announce = self.model.store.prefetch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # the bank gathers blocks by paths on the CPU; moving them to the device would cost a sync per step to read
        # them back
        if isinstance(batch, dict) and "path" in batch:
            moved = super().transfer_batch_to_device({k: v for k, v in batch.items() if k != "path"}, device,
                                                     dataloader_idx)
            moved["path"] = batch["path"]
            return moved
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _world(self) -> tuple[int, int]:
        trainer = self._trainer
        return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)

    def on_fit_start(self) -> None:
        if self.model.store is not None:
            self.model.store.to_compute(self.device)
        ddp = getattr(self.trainer.strategy, "model", None)
        if self.comm_counter is not None and isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            from .affine import counting_allreduce_hook

            # DDP's own mean all-reduce, counted: it carries the anchor and nothing else (the bank is no parameter)
            ddp.register_comm_hook(self.comm_counter, counting_allreduce_hook)

    def on_train_start(self) -> None:
        self._segment_start = self.global_step  # after a resume: the steps this process ran, for rank.json

    def on_train_end(self) -> None:
        if self.comm_counter is None:
            return
        from ..bank.merge import save_rank_bank

        rank, world = self._world()
        out = Path(self.recipe.out_dir) / "ranks" / f"rank-{rank:03d}"
        info = {"comm": self.comm_counter.as_dict(), "steps": self.global_step,
                "segment_steps": self.global_step - getattr(self, "_segment_start", 0),
                "plan": self.subtree_plan.summary(),
                "anchor_grad_bytes": sum(getattr(p, "ds_numel", p.numel()) * p.element_size()  # ZeRO-3: full size
                                         for p in self.model.anchor.parameters() if p.requires_grad)}
        if self.model.store is not None:
            save_rank_bank(self.model.store, out, rank=rank, world=world, info=info)
        else:
            from ..utils import write_json

            write_json(out / "rank.json", {"rank": rank, "world": world, **info})
        self.trainer.strategy.barrier("hmlm-rank-banks")  # rank 0 merges once every rank has written

    def configure_optimizers(self):
        from .deepspeed import anchor_optimizer, is_deepspeed

        opts: list[torch.optim.Optimizer] = []
        deepspeed = is_deepspeed(self.recipe.trainer.strategy)
        if self.train_anchor:
            cfg = self.recipe.optim.anchor
            decay = [p for n, p in self.model.anchor.named_parameters() if p.dim() >= 2]
            no_decay = [p for n, p in self.model.anchor.named_parameters() if p.dim() < 2]
            groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
            opts.append(anchor_optimizer(self.recipe, groups))
        if self.train_memory and deepspeed:
            self.external_bank_optimizer = BankOptimizer(self)
        elif self.train_memory:
            opts.append(BankOptimizer(self))
        return opts

    # ------------------------------------------------------------------ steps
    def _generic_mask(self, batch_size: int) -> torch.Tensor | None:
        if self.generic_prob <= 0:
            return None
        # seeded by the step, not by global RNG state, so resuming reproduces the same draws
        g = torch.Generator().manual_seed(self.recipe.seed * 7_919 + self.global_step)
        # one draw for the global batch, each rank its slice: ranks differ, and N ranks equal one process of N*B
        rank, world = self._world()
        draw = torch.rand(batch_size * world, generator=g)[rank * batch_size:(rank + 1) * batch_size]
        return draw < self.generic_prob

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        chunks = self._reference_ranks()
        if chunks > 1:
            # one process reproducing N subtree ranks: DDP optimises the mean of the per-rank means
            return torch.stack([F.cross_entropy(lg.float().flatten(0, 1), lb.flatten(), ignore_index=-100)
                                for lg, lb in zip(logits.chunk(chunks), labels.chunk(chunks))]).mean()
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    def _reference_ranks(self) -> int:
        plan = self.subtree_plan
        return plan.world if plan is not None and self._world()[1] == 1 else 1

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        step = self.global_step
        max_steps = self.recipe.trainer.max_steps
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        bank_opt = self.external_bank_optimizer
        anchor_opt = opts[0] if self.train_anchor else None
        if anchor_opt is not None:
            lr_a = cosine_lr(step, self.recipe.optim.anchor, max_steps)
            for group in anchor_opt.param_groups:
                group["lr"] = lr_a
            anchor_opt.zero_grad(set_to_none=True)
        if self.train_memory:
            (bank_opt or opts[-1]).param_groups[0]["lr"] = cosine_lr(step, self.recipe.optim.memory, max_steps)

        mode = "fetched" if self.train_memory else "none"
        logits = self.model(batch["input_ids"], paths=batch["path"], memory=mode, doc_ids=self._doc_ids(batch),
                            generic_mask=self._generic_mask(batch["input_ids"].shape[0]),
                            grad_memory=self.train_memory)
        loss = self._loss(logits, batch["labels"])
        self.manual_backward(loss)
        if self._skip_this_update():
            return None

        stats: dict[str, Any] = {}
        if anchor_opt is not None and self.recipe.optim.anchor.grad_clip > 0:
            self.clip_gradients(anchor_opt, gradient_clip_val=self.recipe.optim.anchor.grad_clip,
                                gradient_clip_algorithm="norm")
        # exactly one Lightning-wrapped step per batch: the last optimizer goes through Lightning
        for opt in opts[:-1]:
            opt.optimizer.step()
        opts[-1].step()
        if bank_opt is not None:
            bank_opt.step()
        if self.train_memory:
            last = bank_opt or opts[-1].optimizer
            stats.update({f"memory/{k}": v for k, v in last.last_stats.items()})
        self.train_ppl(logits.detach().float(), batch["labels"])
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True)
        self.log("train/ppl", self.train_ppl, on_step=True, on_epoch=False)
        if anchor_opt is not None:
            self.log("lr/anchor", anchor_opt.param_groups[0]["lr"], on_step=True)
        if self.train_memory:
            self.log("lr/memory", (bank_opt or opts[-1]).param_groups[0]["lr"], on_step=True)
        for key, val in stats.items():
            self.log(key, val, on_step=True)  # tensors stay on the device until Lightning writes the logs
        return loss.detach()

    def _skip_this_update(self) -> bool:
        """The non-finite guard rejected this batch's loss/gradients: no optimizer (anchor or bank) may see them."""
        if not self.skip_update:
            return False
        self.skip_update = False
        if self.model.store is not None:
            self.model.store.discard_fetched()
        return True

    def _doc_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return batch["doc_ids"] if self.recipe.data.doc_mask else None

    @torch.no_grad()
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        for mode in self.eval_modes:
            logits = self.model(batch["input_ids"], paths=batch["path"], memory=mode, doc_ids=self._doc_ids(batch))
            self.val_ppl[mode](logits.float(), batch["labels"])
            self.log(f"val/ppl_{mode}", self.val_ppl[mode], on_step=False, on_epoch=True,
                     prog_bar=mode == self.eval_modes[0])

    # ------------------------------------------------------------------ checkpoint hooks
    def _rank_bank_file(self, step: int, rank: int) -> Path:
        return Path(self.recipe.out_dir) / "checkpoints" / "bank-ranks" / f"step-{step:06d}" / f"rank-{rank:03d}.safetensors"

    def _bank_checkpoint_dir(self, rel: str) -> Path:
        return Path(self.recipe.out_dir) / "checkpoints" / rel

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        store = self.model.store
        if store is not None and store.held:
            # subtree-parallel: every rank runs this hook; each writes its own blocks beside the checkpoint
            from safetensors.torch import save_file

            from ..utils import atomic_write_path

            rank, world = self._world()
            path = self._rank_bank_file(self.global_step, rank)
            with atomic_write_path(path) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in store.state_dict().items()}, str(tmp))
            checkpoint["hmlm_bank_ranks"] = {"step": self.global_step, "world": world}
        elif store is not None:
            # the bank is not pickled into the checkpoint: per-level files beside it (docs/design.md §8), written
            # before Lightning writes the checkpoint that names them
            rel = f"bank/step-{self.global_step:06d}"
            manifest = store.save_checkpoint(self._bank_checkpoint_dir(rel), self.global_step)
            checkpoint["hmlm_bank_checkpoint"] = {"dir": rel, "manifest": manifest}
        checkpoint["hmlm_rng"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        store = self.model.store
        if store is not None and "hmlm_bank_ranks" in checkpoint:
            from safetensors.torch import load_file

            meta, (rank, world) = checkpoint["hmlm_bank_ranks"], self._world()
            if meta["world"] != world or not store.held:
                raise ValueError(f"checkpoint was written by a {meta['world']}-rank subtree-parallel run; resume it "
                                 f"with trainer.data_parallel=subtree on {meta['world']} ranks (this run: {world})")
            path = self._rank_bank_file(int(meta["step"]), rank)
            if not path.is_file():
                raise ValueError(f"{path}: this rank's bank state for the checkpoint is missing")
            store.load_state_dict(load_file(str(path)))
        elif store is not None:
            saved = checkpoint.get("hmlm_bank_checkpoint")
            if saved is None:
                raise ValueError("checkpoint has no memory bank state (`hmlm_bank_checkpoint`): it was written by a "
                                 "run without memory, or by an hmlm from before per-level bank checkpoints; resume "
                                 "it with the same recipe and hmlm version")
            store.load_checkpoint(self._bank_checkpoint_dir(saved["dir"]), saved["manifest"])
        if "hmlm_rng" in checkpoint:
            torch.set_rng_state(checkpoint["hmlm_rng"])

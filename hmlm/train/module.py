"""The LightningModule: anchor + memory bank trained with two optimizers on their own schedules.

Why manual optimization: the anchor's AdamW runs under the Lightning strategy (DDP / DeepSpeed), while the bank is
updated by the store's lazy block-wise AdamW on exactly the fetched blocks, with its own LR schedule, weight decay and
gradient clipping. Lightning's automatic optimization can't express two independently clipped optimizers.

Exactly one Lightning-wrapped optimizer steps per batch (the anchor's, or in `memory` mode the bank's), so
`trainer.global_step` counts batches.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torchmetrics import Metric

from ..config import Recipe
from ..loss import lm_nll
from ..model import MemoryLM
from .step import BankOptimizer, TrainStep, build_anchor_optimizer, clip_gradients


class HeldoutPerplexity(Metric):
    """exp(Σ NLL / Σ tokens) over an epoch, from per-batch sums (summed across ranks): no logits needed."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll: torch.Tensor, count: torch.Tensor) -> None:  # type: ignore[override]
        self.nll += nll.double()
        self.count += count.double()

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll / self.count.clamp(min=1.0))


class _LightningEngine:
    """The shared step's backward / clipping / optimizer steps through Lightning (precision and strategy plugins)."""

    def __init__(self, module: L.LightningModule):
        self.module = module

    def backward(self, loss: torch.Tensor) -> None:
        self.module.manual_backward(loss)  # runs the callbacks' backward hooks: the non-finite guard's among them

    def drop_update(self) -> bool:
        """The non-finite guard (hmlm.train.guard, trainer.nonfinite.skip) rejected this batch after backward."""
        drop, self.module.skip_update = self.module.skip_update, False
        return drop

    def clip(self, optimizer, max_norm: float) -> None:
        if getattr(self.module.trainer.precision_plugin, "scaler", None) is not None:
            # fp16 with a GradScaler: Lightning unscales before clipping (build_anchor_optimizer then isn't fused)
            self.module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
            return
        # No scaler (fp32, bf16-mixed): the gradients are true gradients, so clip them as Lightning would after its
        # checks. Its MixedPrecision plugin refuses any optimizer that can unscale by itself -- torch's fused AdamW --
        # even under bf16, where there is nothing to unscale. Under DeepSpeed the engine clips (its config's
        # gradient_clipping) and Lightning's clip is a no-op, so nothing is done here either.
        from .deepspeed import is_deepspeed

        if is_deepspeed(self.module.recipe.trainer.strategy):
            return
        clip_gradients(optimizer, max_norm)

    def step(self, optimizers) -> None:
        # exactly one Lightning-wrapped step per batch (it advances global_step): the last wrapped optimizer's; an
        # optimizer Lightning does not hold (the bank's under DeepSpeed, which takes exactly one) steps by itself
        wrapped = [opt for opt in optimizers if isinstance(opt, LightningOptimizer)]
        for opt in wrapped[:-1]:
            opt.optimizer.step()
        if wrapped:
            wrapped[-1].step()
        for opt in optimizers:
            if not isinstance(opt, LightningOptimizer):
                opt.step()


class HMLMModule(L.LightningModule):
    def __init__(self, recipe: Recipe, model: MemoryLM):
        super().__init__()
        self.recipe = recipe
        self.model = model
        self.automatic_optimization = False
        # the step shared with `hmlm bench train`; it also decides what trains (it freezes a `memory`-mode anchor)
        self.step_fn = TrainStep(model, recipe)
        self.train_anchor, self.train_memory = self.step_fn.train_anchor, self.step_fn.train_memory
        self.generic_prob = self.step_fn.generic_prob
        self.eval_modes = ("fetched", "generic", "none") if model.has_memory else ("none",)
        if model.has_memory and not model.store.has_generic:
            self.eval_modes = ("fetched", "none")
        # trainer.data_parallel=subtree (hmlm.train.affine): fit() sets the plan; setup() builds the rank's side
        self.subtree_plan = None
        self.bank_sync = None
        self.comm_counter = None
        self.val_ppl = torch.nn.ModuleDict({m: HeldoutPerplexity() for m in self.eval_modes})
        self._engine = _LightningEngine(self)
        # what the progress bar shows: plain floats refreshed on logging steps (a tensor there would sync every step)
        self.progress_metrics: dict[str, float] = {}
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

    def _world(self) -> tuple[int, int]:
        trainer = self._trainer
        return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)

    def on_fit_start(self) -> None:
        if self.model.store is not None:
            self.model.store.to_compute(self.device)
        ddp = getattr(self.trainer.strategy, "model", None)
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and self._world()[1] > 1:
            from .ddp import register_anchor_hook

            # DDP's mean all-reduce of the anchor (the bank is no parameter), in trainer.ddp.grad_reduce's dtype and,
            # under subtree parallelism, counted for rank.json
            register_anchor_hook(ddp, self.recipe.trainer.ddp, self.comm_counter)

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
            if deepspeed:
                opts.append(anchor_optimizer(self.recipe, self.model.anchor))
            else:
                opts.append(build_anchor_optimizer(self.model.anchor, self.recipe.optim.anchor,
                                                   fused=not str(self.recipe.trainer.precision).startswith("16")))
        if self.train_memory:
            bank = BankOptimizer(self.model.store, self.recipe.optim.memory, sync=lambda: self.bank_sync)
            if deepspeed:
                self.external_bank_optimizer = bank
            else:
                opts.append(bank)
        return opts

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Everything but the tree paths goes to the device: the store reads paths on the host (unique blocks,
        bounds), and a path tensor moved to the GPU and back would make every step wait for the GPU."""
        if isinstance(batch, dict) and "path" in batch:
            rest = super().transfer_batch_to_device({k: v for k, v in batch.items() if k != "path"}, device,
                                                    dataloader_idx)
            return {**rest, "path": batch["path"]}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ------------------------------------------------------------------ steps
    def _generic_mask(self, batch_size: int) -> torch.Tensor | None:
        rank, world = self._world()
        return self.step_fn.generic_mask(self.global_step, batch_size, rank, world)

    def _reference_ranks(self) -> int:
        plan = self.subtree_plan
        return plan.world if plan is not None and self._world()[1] == 1 else 1

    def _is_log_step(self, step: int) -> bool:
        """The steps whose metrics Lightning writes to the loggers (Trainer(log_every_n_steps)); what is logged on
        other steps is never written, so reading the loss there would be a host sync for nothing."""
        return (step + 1) % max(1, self.recipe.trainer.log_every) == 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        step = self.global_step
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        bank_opt = self.external_bank_optimizer
        anchor_opt = opts[0] if self.train_anchor else None
        if bank_opt is None and self.train_memory:
            bank_opt = opts[-1]
        rank, world = self._world()
        loss = self.step_fn(batch, step=step, anchor_opt=anchor_opt, bank_opt=bank_opt, engine=self._engine,
                            rank=rank, world=world, groups=self._reference_ranks())
        if loss is None:  # the non-finite guard dropped this batch (trainer.nonfinite.skip): nothing to log
            return None
        if self._is_log_step(step):
            # the only host syncs of a step, and only every log_every steps: reading the loss and the bank's stats
            value = float(loss)
            metrics = {"train/loss": value, "train/ppl": math.exp(min(value, 80.0))}
            if anchor_opt is not None:
                metrics["lr/anchor"] = anchor_opt.param_groups[0]["lr"]
            if bank_opt is not None:
                metrics["lr/memory"] = bank_opt.param_groups[0]["lr"]
                # Lightning wraps the optimizers it holds; the bank's under DeepSpeed is held here, unwrapped
                stats = getattr(bank_opt, "optimizer", bank_opt).last_stats
                metrics.update({f"memory/{k}": float(v) for k, v in stats.items()})
            self.log_dict(metrics, on_step=True, on_epoch=False)
            self.progress_metrics = {"loss": value}
        return loss

    def _doc_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return self.step_fn.doc_ids(batch)

    @torch.no_grad()
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        labels = batch["labels"]
        valid = (labels != -100).float()
        for mode in self.eval_modes:
            ctx = self.model.memory_context(batch["path"], mode)
            nll = lm_nll(self.model.anchor, batch["input_ids"], labels, valid, memory=ctx, doc_ids=self._doc_ids(batch))
            self.val_ppl[mode](nll, valid.sum())
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
        elif store is not None and self._world()[0] == 0:
            # the bank is not pickled into the checkpoint: per-level files beside it (docs/design.md §6), written
            # before Lightning writes the checkpoint that names them. Only rank 0's: Lightning writes only rank 0's
            # checkpoint, and replicated ranks writing the same files at once would tear them (a resume then loads
            # rank 0's bank on every rank)
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

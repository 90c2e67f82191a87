"""The LightningModule: anchor + memory bank trained with two optimizers on their own schedules.

Why manual optimization: the anchor's AdamW runs under the Lightning strategy (DDP / DeepSpeed), while the bank is
updated by the store's lazy block-wise AdamW on exactly the fetched blocks, with its own LR schedule, weight decay and
gradient clipping. Lightning's automatic optimization can't express two independently clipped optimizers.

Exactly one Lightning-wrapped optimizer steps per batch (the anchor's, or in `memory` mode the bank's), so
`trainer.global_step` counts batches.
"""
from __future__ import annotations

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
        self.last_stats = self._module.model.store.step(lr=self.param_groups[0]["lr"], weight_decay=cfg.weight_decay,
                                                        beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
                                                        grad_clip=cfg.grad_clip)


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
        self.val_ppl = torch.nn.ModuleDict({m: Perplexity(ignore_index=-100) for m in self.eval_modes})

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        if self.model.store is not None:
            self.model.store.to_compute(self.device)

    def on_fit_start(self) -> None:
        if self.model.store is not None:
            self.model.store.to_compute(self.device)

    def configure_optimizers(self):
        opts: list[torch.optim.Optimizer] = []
        if self.train_anchor:
            cfg = self.recipe.optim.anchor
            decay = [p for n, p in self.model.anchor.named_parameters() if p.dim() >= 2]
            no_decay = [p for n, p in self.model.anchor.named_parameters() if p.dim() < 2]
            opts.append(torch.optim.AdamW(
                [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps))
        if self.train_memory:
            opts.append(BankOptimizer(self))
        return opts

    # ------------------------------------------------------------------ steps
    def _generic_mask(self, batch_size: int) -> torch.Tensor | None:
        if self.generic_prob <= 0:
            return None
        # seeded by the step, not by global RNG state, so resuming reproduces the same draws
        g = torch.Generator().manual_seed(self.recipe.seed * 7_919 + self.global_step)
        return torch.rand(batch_size, generator=g) < self.generic_prob

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        step = self.global_step
        max_steps = self.recipe.trainer.max_steps
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        anchor_opt = opts[0] if self.train_anchor else None
        if anchor_opt is not None:
            lr_a = cosine_lr(step, self.recipe.optim.anchor, max_steps)
            for group in anchor_opt.param_groups:
                group["lr"] = lr_a
            anchor_opt.zero_grad(set_to_none=True)
        if self.train_memory:
            opts[-1].param_groups[0]["lr"] = cosine_lr(step, self.recipe.optim.memory, max_steps)

        mode = "fetched" if self.train_memory else "none"
        logits = self.model(batch["input_ids"], paths=batch["path"], memory=mode, doc_ids=self._doc_ids(batch),
                            generic_mask=self._generic_mask(batch["input_ids"].shape[0]),
                            grad_memory=self.train_memory)
        loss = self._loss(logits, batch["labels"])
        self.manual_backward(loss)

        stats: dict[str, Any] = {}
        if anchor_opt is not None and self.recipe.optim.anchor.grad_clip > 0:
            self.clip_gradients(anchor_opt, gradient_clip_val=self.recipe.optim.anchor.grad_clip,
                                gradient_clip_algorithm="norm")
        # exactly one Lightning-wrapped step per batch: the last optimizer goes through Lightning
        for opt in opts[:-1]:
            opt.optimizer.step()
        opts[-1].step()
        if self.train_memory:
            stats.update({f"memory/{k}": v for k, v in opts[-1].optimizer.last_stats.items()})
        self.train_ppl(logits.detach().float(), batch["labels"])
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True)
        self.log("train/ppl", self.train_ppl, on_step=True, on_epoch=False)
        if anchor_opt is not None:
            self.log("lr/anchor", anchor_opt.param_groups[0]["lr"], on_step=True)
        if self.train_memory:
            self.log("lr/memory", opts[-1].param_groups[0]["lr"], on_step=True)
        for key, val in stats.items():
            self.log(key, float(val), on_step=True)
        return loss.detach()

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
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.model.store is not None:
            checkpoint["hmlm_bank"] = {k: v.detach().cpu() for k, v in self.model.store.state_dict().items()}
        checkpoint["hmlm_rng"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.model.store is not None:
            if "hmlm_bank" not in checkpoint:
                raise ValueError("checkpoint has no memory bank state (`hmlm_bank`): it was written by a run "
                                 "without memory; resume it with the same recipe")
            self.model.store.load_state_dict(checkpoint["hmlm_bank"])
        if "hmlm_rng" in checkpoint:
            torch.set_rng_state(checkpoint["hmlm_rng"])

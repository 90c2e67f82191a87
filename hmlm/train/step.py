"""One training step of a MemoryLM, shared by `hmlm fit` (HMLMModule.training_step) and `hmlm bench train`.

    learning rates -> forward with the batch's fetched memory -> weighted NLL (hmlm.loss, head fused with a chunked
    cross-entropy) -> backward -> anchor gradient clipping -> anchor AdamW -> the bank's lazy AdamW on the fetched
    blocks

The surrounding engine decides only *how* backward, clipping and optimizer steps run: Lightning's precision and
strategy plugins in `hmlm fit`, plain calls in the bench (`Engine`). Everything else -- schedules, the generic-block
draws, loss weights, compilation -- lives here, so any speed-up of the step shows in both, and the bench measures
what training runs.

Nothing here synchronises the host with the device: the loss comes back as a tensor, and the caller decides when to
read it (HMLMModule reads it on logging steps only).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import torch
from torch.profiler import record_function

from ..config import COMPILE_MODES
from ..loss import lm_nll, token_weights
from .schedule import cosine_lr

if TYPE_CHECKING:
    from ..config import OptimConfig, Recipe
    from ..model import MemoryLM


class Engine(Protocol):
    """How backward, gradient clipping and optimizer steps are run around the shared step."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def clip(self, optimizer: Any, max_norm: float) -> None: ...

    def step(self, optimizers: Sequence[Any]) -> None: ...

    def drop_update(self) -> bool:
        """After backward: True when this batch must not update anything (a non-finite loss the guard skips)."""


class PlainEngine:
    """Plain PyTorch (the bench): loss.backward(), clip_grad_norm_, optimizer.step()."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip(self, optimizer: Any, max_norm: float) -> None:
        clip_gradients(optimizer, max_norm)

    def step(self, optimizers: Sequence[Any]) -> None:
        for opt in optimizers:
            opt.step()

    def drop_update(self) -> bool:
        return False


def clip_gradients(optimizer: Any, max_norm: float) -> None:
    """Clip the gradients of `optimizer`'s parameters to a global L2 norm of `max_norm`, as clip_grad_norm_ does.

    torch's fused Adam/AdamW take a gradient divisor (`grad_scale`, the attribute GradScaler sets to unscale) and
    apply it inside their single kernel, so with them the clip costs one read of the gradients for the norm instead
    of clip_grad_norm_'s extra read-modify-write pass over every gradient (~2 of its 3 ms per step at the 160M shape
    on an H100). The kernel divides where clip_grad_norm_ multiplies: equal to within an ulp. Other optimizers (and
    fp16 under a GradScaler, whose optimizer is not fused) get clip_grad_norm_. No host sync either way.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper holds the torch optimizer
    params = [p for group in inner.param_groups for p in group["params"]]
    if isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and inner.defaults.get("fused"):
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
            # 1 / clip_grad_norm_'s coefficient min(1, max_norm / (norm + 1e-6))
            inner.grad_scale = ((norm.float() + 1e-6) / max_norm).clamp(min=1.0)
        return
    torch.nn.utils.clip_grad_norm_(params, max_norm)


class BankOptimizer(torch.optim.Optimizer):
    """Adapter that lets Lightning (or the bench) drive the bank's lazy AdamW like any optimizer (lr in param_groups).

    `sync` returns the subtree-parallel BankSync of this rank (or None): it scales to the global loss, reduces shared
    blocks in their owner groups and gives the global norm for clipping.
    """

    def __init__(self, store: Any, cfg: "OptimConfig", sync: Callable[[], Any] = lambda: None):
        self._store, self._cfg, self._sync = store, cfg, sync
        # torch optimizers need one parameter; this placeholder never receives a gradient
        super().__init__([torch.zeros((), requires_grad=True)], {"lr": cfg.lr})
        self.last_stats: dict[str, float] = {}

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if closure is not None:
            with torch.enable_grad():
                closure()
        cfg, store, sync = self._cfg, self._store, self._sync()
        with record_function("hmlm.bank_optim"):
            norm = sync.reduce(store, global_norm=cfg.grad_clip > 0) if sync is not None else None
            self.last_stats = store.step(lr=self.param_groups[0]["lr"], weight_decay=cfg.weight_decay,
                                         beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, grad_clip=cfg.grad_clip,
                                         grad_norm=norm)


def anchor_param_groups(anchor: torch.nn.Module, cfg: "OptimConfig") -> list[dict[str, Any]]:
    """The anchor's trainable parameters in two AdamW groups: weight decay on matrices only."""
    named = [(n, p) for n, p in anchor.named_parameters() if p.requires_grad]
    return [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]


def build_anchor_optimizer(anchor: torch.nn.Module, cfg: "OptimConfig", *, fused: bool = True) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; torch's fused implementation where it has one (CUDA and CPU: one
    kernel over all parameters instead of ~10 per parameter; 4x faster on the quickstart's CPU, same result to 1e-8)."""
    groups = anchor_param_groups(anchor, cfg)
    params = [p for g in groups for p in g["params"]]
    # fused=False for fp16 with a GradScaler: Lightning refuses to clip an optimizer that unscales by itself
    fused = fused and bool(params) and all(p.device.type in ("cuda", "cpu") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


class TrainStep:
    """The training step of `model` under `recipe` (see the module docstring).

    What trains follows trainer.mode: the anchor unless `memory` (its parameters are frozen then), the bank unless
    `anchor` or the model has none. A fraction memory.generic_prob of the sequences (default 1/(k+1) when the bank
    has a generic block, as in the paper) gets the generic block instead of its path's.

    With trainer.compile (or `compile=True`) the forward and loss -- memory deltas included; the fetch itself stays
    eager, it has data-dependent shapes -- run under torch.compile with trainer.compile_mode; AOTAutograd compiles
    the backward too.
    """

    def __init__(self, model: "MemoryLM", recipe: "Recipe", *, compile: bool | None = None,
                 compile_mode: str | None = None, compile_backend: str = "inductor"):
        self.model, self.recipe = model, recipe
        mode = recipe.trainer.mode
        self.train_anchor = mode != "memory"
        self.train_memory = mode != "anchor" and model.has_memory
        for p in model.anchor.parameters():
            p.requires_grad_(self.train_anchor)
        p_generic = recipe.memory.generic_prob
        if p_generic is None:
            k = recipe.index.router.branching
            p_generic = 1.0 / (k + 1) if self.train_memory and recipe.memory.generic else 0.0
        self.generic_prob = p_generic if (model.store is not None and model.store.has_generic) else 0.0
        compile = recipe.trainer.compile if compile is None else compile
        compile_mode = compile_mode or recipe.trainer.compile_mode
        self.compiled = compile
        # CUDA graphs (reduce-overhead, max-autotune): each step tells them a new iteration starts, so the graphs'
        # output buffers of the previous step may be reused (the loss a caller still holds is read before that)
        self.cudagraphs = compile and compile_mode in ("reduce-overhead", "max-autotune")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"trainer.compile_mode: {compile_mode!r}; expected one of {', '.join(COMPILE_MODES)}")
        self._nll: Callable[..., torch.Tensor] = self._forward_nll
        if compile:
            # compile_backend="aot_eager" (tests): the same graph capture and AOTAutograd, no code generation
            self._nll = torch.compile(self._forward_nll, backend=compile_backend,
                                      mode=None if compile_mode == "default" else compile_mode)

    def _forward_nll(self, input_ids: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, memory: Any,
                     doc_ids: torch.Tensor | None) -> torch.Tensor:
        return lm_nll(self.model.anchor, input_ids, labels, weights, memory=memory, doc_ids=doc_ids)

    # ---------------------------------------------------------------- pieces
    def generic_mask(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> torch.Tensor | None:
        """Which sequences get the generic block this step ([batch_size] bool), or None when none can."""
        if self.generic_prob <= 0:
            return None
        # seeded by the step, not by global RNG state, so resuming reproduces the same draws
        g = torch.Generator().manual_seed(self.recipe.seed * 7_919 + step)
        # one draw for the global batch, each rank its slice: ranks differ, and N ranks equal one process of N*B
        draw = torch.rand(batch_size * world, generator=g)[rank * batch_size:(rank + 1) * batch_size]
        return draw < self.generic_prob

    def set_learning_rates(self, step: int, anchor_opt: Any, bank_opt: Any) -> None:
        max_steps = self.recipe.trainer.max_steps
        if anchor_opt is not None:
            lr = cosine_lr(step, self.recipe.optim.anchor, max_steps)
            for group in anchor_opt.param_groups:
                group["lr"] = lr
        if bank_opt is not None:
            bank_opt.param_groups[0]["lr"] = cosine_lr(step, self.recipe.optim.memory, max_steps)

    def doc_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return batch["doc_ids"] if self.recipe.data.doc_mask else None

    def loss(self, batch: dict[str, torch.Tensor], *, step: int, rank: int = 0, world: int = 1,
             groups: int = 1) -> torch.Tensor:
        """Forward and loss of one training batch (the mean NLL; `groups` > 1: the mean of that many ranks' means)."""
        ids, labels = batch["input_ids"], batch["labels"]
        with record_function("hmlm.fetch"):
            ctx = self.model.memory_context(batch["path"], "fetched" if self.train_memory else "none",
                                            generic_mask=self.generic_mask(step, ids.shape[0], rank, world),
                                            grad=self.train_memory)
        with record_function("hmlm.forward_loss"):
            return self._nll(ids, labels, token_weights(labels, groups), ctx, self.doc_ids(batch))

    # ---------------------------------------------------------------- the step
    def __call__(self, batch: dict[str, torch.Tensor], *, step: int, anchor_opt: Any, bank_opt: Any,
                 engine: Engine, rank: int = 0, world: int = 1, groups: int = 1) -> torch.Tensor | None:
        """Run one step; returns the detached loss (no host sync), or None when the engine dropped the update (the
        non-finite guard's skip mode). Optimizers not trained are None."""
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        self.set_learning_rates(step, anchor_opt, bank_opt)
        if anchor_opt is not None:
            anchor_opt.zero_grad(set_to_none=True)
        loss = self.loss(batch, step=step, rank=rank, world=world, groups=groups)
        with record_function("hmlm.backward"):
            engine.backward(loss)
        if engine.drop_update():
            # no optimizer may see this batch: the anchor's gradients are cleared by the next step's zero_grad, the
            # bank's fetched blocks and their gradients are released here
            if self.model.store is not None:
                self.model.store.discard_fetched()
            return None
        clip = self.recipe.optim.anchor.grad_clip
        if anchor_opt is not None and clip > 0:
            with record_function("hmlm.clip"):
                engine.clip(anchor_opt, clip)
        # one engine call for all optimizers: under Lightning it advances global_step once per batch; the bank's
        # lazy AdamW has its own region inside (hmlm.bank_optim)
        with record_function("hmlm.optim"):
            engine.step([opt for opt in (anchor_opt, bank_opt) if opt is not None])
        # under CUDA graphs the loss lives in a graph's output buffer, which the next step's replay overwrites: a
        # copy (one tiny kernel) is the caller's to keep, e.g. for a progress bar read steps later
        return loss.detach().clone() if self.cudagraphs else loss.detach()

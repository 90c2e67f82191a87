"""`trainer.strategy: deepspeed_stage_1|2|3`: the anchor under Lightning's DeepSpeedStrategy, the bank outside it.

The bank is hmlm's store (not an nn.Module), so the DeepSpeed engine never sees it: it neither casts, moves, shards,
all-reduces nor checkpoints a block. The bank's lazy AdamW is stepped by HMLMModule itself after the engine's step
(DeepSpeed accepts exactly one optimizer), and `trainer.data_parallel=subtree` works unchanged (BankSync only uses
torch.distributed). What DeepSpeed changes, and where it is handled here:

* clipping: Lightning's `clip_gradients` is a no-op under DeepSpeed, so `optim.anchor.grad_clip` goes into the
  DeepSpeed config (`gradient_clipping`);
* precision: DeepSpeed's own `bf16` mode casts the module's parameters to bf16, which the bank's fp32 blocks would
  then meet inside the anchor. `bf16-mixed` is therefore run as Lightning `32-true` plus DeepSpeed's
  `torch_autocast` (fp32 weights, bf16 matmuls), the same numerics as Lightning's bf16-mixed under DDP;
* gradient reduction dtype (`trainer.deepspeed.grad_reduce`), bucket size (`trainer.deepspeed.bucket_mb`) and CPU
  offload of the anchor's optimizer (`trainer.deepspeed.offload_optimizer`, with DeepSpeedCPUAdam);
* checkpoints: DeepSpeed writes a *directory* per checkpoint. `HMLMDeepSpeedStrategy` writes it into a temp
  directory, swaps it in with one rename and then writes `<name>.ckpt.sha256` listing every file
  (hmlm.train.checkpoints), so keep_last, --resume's choice of the newest checkpoint that verifies and the refusal
  of a modified checkpoint work as for Lightning's single files.

DeepSpeed runs on CUDA only (Lightning refuses other accelerators); `check_available` says so before training.
Tests run the same code on CPU through a test-only subclass that allows the CPU accelerator (tests/ds_cpu.py).
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from ..config import DEEPSPEED_STRATEGIES, Recipe
from .checkpoints import write_dir_sidecar
from .errors import FitError

__all__ = ["DEEPSPEED_STRATEGIES", "HMLMDeepSpeedStrategy", "build_strategy", "check_available", "deepspeed_config",
           "is_deepspeed", "lightning_precision"]


def is_deepspeed(strategy: Any) -> bool:
    return isinstance(strategy, str) and strategy in DEEPSPEED_STRATEGIES


def _stage(recipe: Recipe) -> int:
    return int(recipe.trainer.strategy.rsplit("_", 1)[-1])


def check_available(recipe: Recipe, source: str, *, cuda: bool | None = None) -> None:
    """Before anything is written: deepspeed is importable and the accelerator is one the strategy runs on."""
    from ..config import RecipeError

    t = recipe.trainer
    if importlib.util.find_spec("deepspeed") is None:
        raise RecipeError(f"{source}: key `trainer.strategy`={t.strategy!r} needs the deepspeed package, which is not "
                          "installed; `pip install deepspeed` (0.19.8 is tested) or use trainer.strategy=ddp")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    allowed = strategy_class.accelerators
    wanted = "cuda" if t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and cuda) else str(t.accelerator)
    if wanted == "auto":
        wanted = "cpu"
    if wanted not in allowed or (wanted == "cuda" and not cuda):
        raise RecipeError(f"{source}: key `trainer.strategy`={t.strategy!r} runs on CUDA GPUs only (DeepSpeed through "
                          f"Lightning), but `trainer.accelerator`={t.accelerator!r} gives {wanted}"
                          f"{'' if cuda else ' (torch sees no CUDA GPU)'}; use trainer.strategy=ddp or auto here")


def lightning_precision(precision: str) -> str:
    """What Lightning is told: bf16-mixed becomes 32-true (+ DeepSpeed's torch_autocast, see deepspeed_config)."""
    return "32-true" if precision in ("bf16-mixed", "bf16") else precision


def deepspeed_config(recipe: Recipe, precision: str) -> dict[str, Any]:
    """The DeepSpeed config dict for `recipe` (`precision` is the resolved Lightning precision, before
    lightning_precision)."""
    t, ds = recipe.trainer, recipe.trainer.deepspeed
    bucket = int(ds.bucket_mb * 1_000_000)
    zero: dict[str, Any] = {"stage": _stage(recipe), "contiguous_gradients": True, "overlap_comm": True,
                            "reduce_scatter": True, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg: dict[str, Any] = {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # the bank's blocks are no engine parameters: this clips the anchor alone, like clip_gradients under DDP
        "gradient_clipping": float(recipe.optim.anchor.grad_clip),
        "train_micro_batch_size_per_gpu": t.batch_size,
        "steps_per_print": 10 ** 9,   # hmlm logs its own metrics
        "wall_clock_breakdown": False,
    }
    if precision in ("bf16-mixed", "bf16"):
        autocast: dict[str, Any] = {"enabled": True, "dtype": "bfloat16"}
        if ds.grad_reduce == "fp32":
            # with autocast, DeepSpeed reduces the gradients of these module types in the autocast dtype; none: fp32
            autocast["lower_precision_safe_modules"] = []
        cfg["torch_autocast"] = autocast
    elif ds.grad_reduce != "auto":
        cfg["communication_data_type"] = ds.grad_reduce
    return cfg


def anchor_optimizer(recipe: Recipe, anchor: torch.nn.Module) -> torch.optim.Optimizer:
    """The anchor's AdamW under DeepSpeed: unfused (the engine wraps it; the fused kernel is untested there); with the
    optimizer offloaded to the host, DeepSpeed's fused CPU Adam (a torch AdamW there is refused by DeepSpeed and would
    be several times slower)."""
    from .step import anchor_param_groups, build_anchor_optimizer

    cfg = recipe.optim.anchor
    if recipe.trainer.deepspeed.offload_optimizer:
        return cpu_adam_class()(anchor_param_groups(anchor, cfg), adamw_mode=True, lr=cfg.lr,
                                betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    return build_anchor_optimizer(anchor, cfg, fused=False)


def cpu_adam_class() -> type:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam


class HMLMDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy with atomic, checksummed checkpoint directories (see the module docstring)."""

    accelerators: tuple[str, ...] = ("cuda",)

    def __init__(self, *args: Any, on_saved: Callable[[Path], None] | None = None, verify: bool = True,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.on_saved = on_saved
        self.verify = verify

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        final = Path(self.broadcast(str(filepath)))
        tmp = final.with_name(f".{final.name}.partial.tmp")
        old = final.with_name(f".{final.name}.old")
        if self.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier("hmlm-ds-ckpt-start")
        # every rank writes its shards into the temp directory (DeepSpeed synchronises the ranks inside)
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("hmlm-ds-ckpt-written")
        if self.is_global_zero:
            # the same swap as hmlm.utils.atomic_dir (whose .old/.tmp leftovers RunDir repairs), across ranks
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                final.replace(old)
            tmp.replace(final)
            shutil.rmtree(old, ignore_errors=True)
            write_dir_sidecar(final)
            if self.on_saved is not None:
                self.on_saved(final)
        self.barrier("hmlm-ds-ckpt-done")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        from .checkpoints import checkpoint_problem

        # DeepSpeed's loader unpickles (weights_only=False): read only a directory whose files match the checksums
        # hmlm wrote for it
        if self.verify and (problem := checkpoint_problem(Path(checkpoint_path))) is not None:
            raise FitError(f"{checkpoint_path}: {problem}")
        return super().load_checkpoint(checkpoint_path, weights_only)


# the class fit() builds; tests swap in a CPU subclass (tests/ds_cpu.py)
strategy_class: type[HMLMDeepSpeedStrategy] = HMLMDeepSpeedStrategy


def build_strategy(recipe: Recipe, precision: str, *, on_saved: Callable[[Path], None] | None,
                   verify: bool) -> HMLMDeepSpeedStrategy:
    return strategy_class(config=deepspeed_config(recipe, precision), on_saved=on_saved, verify=verify)


def release_from_engine(module: torch.nn.Module) -> None:
    """Give every parameter its own full tensor again after training, on every rank (a collective under ZeRO-3).

    ZeRO 1/2 leave the parameters as views into one flat buffer (safetensors refuses to save views of a larger
    storage, and tied weights would be written as such); ZeRO-3 leaves partitioned placeholders, gathered here. The
    module can then be exported like any other."""
    params = list(module.parameters())
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            full = {id(p): p.data.detach().clone() for p in partitioned}
    else:
        full = {}
    for p in params:
        p.data = full[id(p)] if id(p) in full else p.data.detach().clone()

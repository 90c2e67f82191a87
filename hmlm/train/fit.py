"""`hmlm fit`: index (if needed) -> build the model from the registry -> Lightning Trainer -> model directory.

The run directory (`out_dir`) holds `index/` (unless index.dir points elsewhere), `checkpoints/` (every
trainer.ckpt_every steps, plus last.ckpt), `logs/` (CSV and TensorBoard) and the exported `model/`.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from rich.console import Console
from rich.table import Table

from ..config import Recipe, to_yaml
from ..data.packing import SequenceShards
from ..export import load_model_dir, save_model_dir
from ..index import ensure_index, read_index_meta
from ..model import build_model
from .datamodule import ShardDataModule
from .module import HMLMModule
from .progress import StepProgressBar, quiet_lightning_noise


class FitError(RuntimeError):
    pass


def _precision(recipe: Recipe) -> str:
    if recipe.trainer.precision != "auto":
        return recipe.trainer.precision
    return "bf16-mixed" if torch.cuda.is_available() and recipe.trainer.accelerator in ("auto", "gpu", "cuda") \
        else "32-true"


def init_anchor_from(model, source: str) -> None:
    """Copy anchor weights from a model directory (anchor.safetensors), a Lightning checkpoint (weights only) or,
    for an anchor with `load_pretrained` (hf), a local Hugging Face checkpoint directory (config.json)."""
    src = Path(source)
    hf_dir = src.is_dir() and (src / "config.json").is_file() and not (src / "anchor.safetensors").is_file()
    if hf_dir and hasattr(model.anchor, "load_pretrained"):
        try:
            model.anchor.load_pretrained(src)
        except ValueError as exc:
            raise FitError(str(exc)) from None
        return
    if src.is_dir():
        from safetensors.torch import load_model

        if not (src / "anchor.safetensors").is_file():
            hf_hint = (" or, with anchor.name=hf, a local Hugging Face checkpoint directory (config.json + "
                       "model*.safetensors, as written by save_pretrained)")
            raise FitError(f"anchor.init_from: {src} holds no anchor.safetensors; expected an hmlm model directory "
                           f"(written by hmlm fit under <out_dir>/model){hf_hint}")
        load_model(model.anchor, str(src / "anchor.safetensors"))
        return
    if not src.is_file():
        raise FitError(f"anchor.init_from: {src} does not exist (give a model directory or a .ckpt file)")
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    state = {k[len("model.anchor."):]: v for k, v in ckpt.get("state_dict", {}).items()
             if k.startswith("model.anchor.")}
    if not state:
        raise FitError(f"anchor.init_from: {src} holds no anchor weights (keys model.anchor.*)")
    model.anchor.load_state_dict(state)


def _tensorboard_available() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


def _checkpoint_step(path: Path) -> int:
    """The checkpoint's global step; also the early, clear failure for a truncated or foreign checkpoint."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip, pickle of arbitrary objects refused by weights_only, ...
        raise FitError(f"{path}: cannot read this checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                       "it is corrupt or was not written by hmlm fit. Delete it to resume from an earlier "
                       "step-*.ckpt, or start without --resume") from None
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise FitError(f"{path}: not a Lightning checkpoint written by hmlm fit (no global_step)")
    return int(ckpt["global_step"])


def last_checkpoint(out_dir: Path) -> Path | None:
    last = out_dir / "checkpoints" / "last.ckpt"
    return last if last.is_file() else None


def fit(recipe: Recipe, *, resume: bool = False, console: Console | None = None,
        progress: bool = True, final_eval: bool = True, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train `recipe` (see the module docstring); `callbacks` are extra Lightning callbacks (e.g. a bench's timer)."""
    console = console or Console()
    t0 = time.perf_counter()
    out_dir = Path(recipe.out_dir)
    ckpt_path = None
    if resume:
        ckpt_path = last_checkpoint(out_dir)
        if ckpt_path is None:
            raise FitError(f"--resume: no checkpoint at {out_dir / 'checkpoints' / 'last.ckpt'}; "
                           "start without --resume")
    index_dir = ensure_index(recipe, console)
    index_meta = read_index_meta(index_dir)
    if index_meta["seq_len"] != recipe.data.seq_len:
        raise FitError(f"index {index_dir} was packed with seq_len {index_meta['seq_len']}, recipe asks "
                       f"{recipe.data.seq_len}")
    from ..data.tokenizer import padded_vocab_size

    vocab = padded_vocab_size(index_meta["tokenizer"]["vocab_size"])
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    model = build_model(recipe, vocab)
    if recipe.anchor.init_from:
        init_anchor_from(model, recipe.anchor.init_from)
    module = HMLMModule(recipe, model)
    dm = ShardDataModule(index_dir, batch_size=recipe.trainer.batch_size, seed=recipe.seed,
                         num_workers=recipe.data.num_workers)

    out_dir.mkdir(parents=True, exist_ok=True)
    if ckpt_path is None:
        stale = [d for d in (out_dir / "checkpoints", out_dir / "logs", out_dir / "ranks") if d.exists()]
        if stale:
            # a fresh run must not mix its checkpoints/logs with an older run's (use --resume to continue that one)
            console.print(f"[yellow]fit[/] starting a new run in {out_dir}: removing the previous run's "
                          f"{', '.join(d.name for d in stale)} (pass --resume to continue it instead)")
            for d in stale:
                shutil.rmtree(d)
    (out_dir / "recipe.yaml").write_text(to_yaml(recipe), encoding="utf-8")
    ckpt_cb = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="step-{step:06d}", save_last=True,
                              every_n_train_steps=recipe.trainer.ckpt_every, save_top_k=-1,
                              auto_insert_metric_name=False)
    callbacks = [ckpt_cb, *(callbacks or [])]
    if recipe.trainer.eval_every > 0:
        from ..eval.callback import BucketEvalCallback

        callbacks.append(BucketEvalCallback(every_n_steps=recipe.trainer.eval_every, tasks=recipe.trainer.eval_tasks,
                                            memory=recipe.trainer.eval_memory, limit=recipe.trainer.eval_limit,
                                            batch_size=recipe.trainer.batch_size))
    if progress:
        callbacks.append(StepProgressBar(leave=True))
    quiet_lightning_noise()
    # a resumed segment logs beside the first one (Lightning's CSV writer would otherwise overwrite metrics.csv)
    segment = "" if ckpt_path is None else f"resume-{_checkpoint_step(ckpt_path):06d}"
    loggers: list[Any] = [CSVLogger(out_dir, name="logs", version=segment)]
    if _tensorboard_available():
        loggers.append(TensorBoardLogger(out_dir, name="logs", version=f"tb{('-' + segment) if segment else ''}"))
    else:
        console.print("[yellow]fit[/] tensorboard is not installed: logging to CSV only (pip install tensorboard)")
    n_val = len(SequenceShards(index_dir / "shards", "val"))
    strategy: Any = recipe.trainer.strategy
    if recipe.trainer.data_parallel == "subtree" and strategy == "ddp":
        from .affine import subtree_ddp_strategy

        strategy = subtree_ddp_strategy()  # also runs a frozen anchor (DDP proper refuses a module it can't train)
    trainer = L.Trainer(
        accelerator=recipe.trainer.accelerator, devices=recipe.trainer.devices, strategy=strategy,
        precision=_precision(recipe), max_steps=recipe.trainer.max_steps, max_epochs=-1,
        val_check_interval=recipe.trainer.val_every if n_val else None, check_val_every_n_epoch=None,
        limit_val_batches=recipe.trainer.val_batches if n_val else 0, num_sanity_val_steps=0,
        log_every_n_steps=recipe.trainer.log_every, callbacks=callbacks, logger=loggers,
        enable_progress_bar=progress, enable_model_summary=False, deterministic=False,
        use_distributed_sampler=False, default_root_dir=out_dir)
    if recipe.trainer.data_parallel == "subtree":
        from .affine import SubtreePlanError, plan_for_recipe

        try:
            plan = plan_for_recipe(recipe, index_dir, trainer.world_size)
        except SubtreePlanError as exc:
            raise FitError(str(exc)) from None
        module.subtree_plan = dm.subtree_plan = plan
        console.print(f"[bold]fit[/] subtree-parallel: {plan.summary()}")
        if trainer.world_size > 1 and n_val:
            # a rank holds only its own blocks, so it can't score other subtrees; the merged model is scored instead
            trainer.limit_val_batches = 0
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    train_seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"out_dir": str(out_dir), "steps": trainer.global_step,
                              "seconds": round(train_seconds, 1)}
    export_model = module.model
    if module.subtree_plan is not None and trainer.world_size > 1 and trainer.is_global_zero \
            and module.model.store is not None:
        from ..bank.merge import merge_rank_banks, rank_dirs
        from ..model import MemoryLM, build_store

        # every rank wrote its blocks to out_dir/ranks/ (HMLMModule.on_train_end); one full bank again
        full = merge_rank_banks(rank_dirs(out_dir), build_store(recipe, module.model.layout, init=False))
        export_model = MemoryLM(module.model.anchor, module.model.layout, full)
    if trainer.is_global_zero:
        model_dir = save_model_dir(export_model, recipe, index_dir, out_dir / "model",
                                   extra={"train": {"steps": trainer.global_step,
                                                    "seconds": round(train_seconds, 1)}})
        result["model_dir"] = str(model_dir)
        if final_eval and n_val:
            from ..eval.perplexity import heldout_perplexity

            loaded = load_model_dir(model_dir, device=module.device)
            ppl = heldout_perplexity(loaded, index_dir, batch_size=recipe.trainer.batch_size, progress=progress)
            result["heldout_perplexity"] = ppl
            table = Table(title=f"held-out perplexity ({n_val} sequences, {index_dir})")
            table.add_column("memory")
            table.add_column("perplexity", justify="right")
            for mode, value in ppl.items():
                table.add_row(mode, f"{value:.2f}")
            console.print(table)
        (out_dir / "fit_result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    console.print(f"[bold]fit[/] done: {trainer.global_step} steps in {time.perf_counter() - t0:.1f} s -> "
                  f"{result.get('model_dir', out_dir)}")
    return result

"""`hmlm fit`: check -> lock the run dir -> index (if needed) -> build the model -> Lightning Trainer -> model dir.

The run directory (`out_dir`) holds `index/` (unless index.dir points elsewhere), `checkpoints/` (every
trainer.ckpt_every steps, the newest trainer.keep_last of them kept, plus last.ckpt; each with a .sha256 sidecar),
`logs/` (CSV and TensorBoard) and the exported `model/`. What protects it (docs/design.md, "Data safety"):
hmlm.train.preflight (everything checked before the disk is touched), hmlm.train.rundir (lock, previous run,
interrupted writes), hmlm.train.checkpoints (checksummed checkpoints, choosing one to resume), hmlm.train.guard
(non-finite loss/gradient/weights).
"""
from __future__ import annotations

import json
import math
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
from ..export import load_model_dir, save_model_dir
from ..index import built_for_other_settings, read_index_meta, use_index
from ..model import MemoryLM, build_model
from ..utils import atomic_write_path
from .checkpoints import ChecksummedCheckpointIO, RecipeStamp
from .deepspeed import is_deepspeed
from .datamodule import ShardDataModule
from .errors import FitError, short_reason
from .guard import NonFiniteGuard, first_nonfinite_weight
from .module import HMLMModule
from .preflight import RunState, check_run_state, check_state_fits, index_vocab, model_stamp, precision_for, preflight
from .progress import StepProgressBar, quiet_lightning_noise
from .rundir import RunDir, is_primary_process

__all__ = ["FitError", "fit", "init_anchor_from"]


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
    if src.is_dir() and (src / "latest").is_file():
        raise FitError(f"anchor.init_from: {src} is a DeepSpeed checkpoint directory; give the run's model/ directory, "
                       f"or convert it to one file first (`python {src / 'zero_to_fp32.py'} {src} <out-dir>`)")
    if src.is_dir():
        from safetensors.torch import load_model

        if not (src / "anchor.safetensors").is_file():
            hf_hint = (" or, with anchor.name=hf, a local Hugging Face checkpoint directory (config.json + "
                       "model*.safetensors, as written by save_pretrained)")
            raise FitError(f"anchor.init_from: {src} holds no anchor.safetensors; expected an hmlm model directory "
                           f"(written by hmlm fit under <out_dir>/model){hf_hint}")
        try:
            load_model(model.anchor, str(src / "anchor.safetensors"))
        except Exception as exc:  # safetensors: truncated file, other shapes (another recipe's anchor)
            raise FitError(f"anchor.init_from: {src / 'anchor.safetensors'}: cannot load it into this recipe's anchor "
                           f"({short_reason(exc)})") from None
        return
    if not src.is_file():
        raise FitError(f"anchor.init_from: {src} does not exist (give a model directory or a .ckpt file)")
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, a pickle weights_only refuses, an unreadable file
        raise FitError(f"anchor.init_from: {src}: cannot read it as a checkpoint ({short_reason(exc)})") from None
    state = {k[len("model.anchor."):]: v for k, v in (ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else
                                                      {}).items() if k.startswith("model.anchor.")}
    if not state:
        raise FitError(f"anchor.init_from: {src} holds no anchor weights (keys model.anchor.*)")
    try:
        model.anchor.load_state_dict(state)
    except RuntimeError as exc:
        raise FitError(f"anchor.init_from: {src}: its anchor does not fit this recipe's anchor "
                       f"({short_reason(exc)})") from None


def _tensorboard_available() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


def fit(recipe: Recipe, *, resume: bool | str = False, overwrite: bool = False, verify: bool = True,
        source: str | None = None, console: Console | None = None, progress: bool = True,
        final_eval: bool = True, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train `recipe`; returns what fit_result.json holds.

    resume: False (a new run), True (the newest checkpoint of out_dir that verifies) or a checkpoint file name or path.
    overwrite: a new run over an existing one (moved aside until the new one's first checkpoint, see rundir).
    verify: check checksums of the index, the checkpoint and anchor.init_from (False trusts files without them).
    source: the recipe file, named in error messages (the CLI passes it).
    callbacks: extra Lightning callbacks (e.g. `hmlm bench fit-overhead`'s timer).
    """
    console = console or Console()
    source = source or f"recipe {recipe.name!r}"
    command = f"hmlm fit --recipe {source}" if source.endswith((".yaml", ".yml")) else "hmlm fit --recipe <recipe>"
    t0 = time.perf_counter()
    primary = is_primary_process()
    preflight(recipe, source=source, verify=verify)
    out_dir = Path(recipe.out_dir)
    run = RunDir(out_dir, console, command=command) if primary else None
    if run is not None:
        index_dir = Path(recipe.index.dir)
        inside = index_dir.parent.resolve() == out_dir.resolve()
        run.lock(keep=(index_dir.name,) if inside else ())
    failed = True
    try:
        state = check_run_state(recipe, source=source, resume=resume, overwrite=overwrite, verify=verify,
                                primary=primary, command=command)
        if run is not None and overwrite and inside and built_for_other_settings(index_dir, recipe):
            # the index inside the run directory belongs to the run being replaced (e.g. the quickstart after its
            # recipe changed): it goes aside with that run and comes back with it if this one fails
            console.print(f"[yellow]fit[/] --overwrite: {index_dir} was built with other data/index settings than "
                          "this recipe; it is set aside with the previous run and a new index is built")
            run.move_aside(also=(index_dir.name,))
        with use_index(recipe, console, verify=verify and primary, progress=progress) as index_dir:
            result = _train(recipe, state, index_dir, run, overwrite=overwrite, console=console, source=source,
                            verify=verify, progress=progress, final_eval=final_eval, t0=t0,
                            extra_callbacks=callbacks or [])
        failed = False
        return result
    finally:
        if run is not None:
            run.close(failed=failed)


def _train(recipe: Recipe, state: RunState, index_dir: Path, run: RunDir | None, *, overwrite: bool,
           console: Console, source: str, verify: bool, progress: bool, final_eval: bool,
           t0: float, extra_callbacks: list[Any]) -> dict[str, Any]:
    out_dir = Path(recipe.out_dir)
    index_meta = read_index_meta(index_dir)
    if index_meta["seq_len"] != recipe.data.seq_len:
        raise FitError(f"index {index_dir} was packed with seq_len {index_meta['seq_len']}, recipe asks "
                       f"{recipe.data.seq_len}")
    n_val = int(index_meta.get("counts", {}).get("val_sequences", 0))
    if n_val == 0:
        console.print("[yellow]fit[/] no validation split (data.val_fraction=0): training without validation or "
                      "held-out perplexity")
    module, dm = _build(recipe, state, index_dir, source, with_val=n_val > 0)
    plan = getattr(module.model.store, "plan", None)
    if plan:  # where each level went (memory.tiers: auto decides from this machine's memory budgets)
        from ..bank.tiers import describe

        console.print(f"[bold]fit[/] bank tiers (memory.tiers={recipe.memory.tiers}): {describe(plan)}")

    # everything that can be checked has been: only now does the previous run (--overwrite) or a checkpoint newer than
    # the one resumed from make way, and only until the first new checkpoint if training fails
    if run is not None:
        if state.resume is not None:
            run.supersede(state.resume.supersede)
        elif overwrite:
            run.move_aside()
        with atomic_write_path(out_dir / "recipe.yaml") as tmp:
            tmp.write_text(to_yaml(recipe), encoding="utf-8")
    guard = NonFiniteGuard(skip=recipe.trainer.nonfinite.skip, check_every=recipe.trainer.log_every, source=source,
                           datamodule=dm, console=console)
    trainer = _trainer(recipe, state, [guard, *extra_callbacks], run,
                       validate=n_val > 0 and recipe.trainer.val_batches > 0, verify=verify, progress=progress,
                       console=console)
    if recipe.trainer.data_parallel == "subtree":
        _plan_subtrees(recipe, index_dir, trainer, module, dm, console)
    ckpt_path = None
    if state.resume is not None:
        ckpt_path = str(state.resume.path)
        skipped = "".join(f"; skipped {s}" for s in state.resume.skipped)
        console.print(f"[bold]fit[/] resuming from {state.resume.path} (step {state.resume.step}){skipped}")
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    if is_deepspeed(recipe.trainer.strategy):
        from .deepspeed import release_from_engine

        release_from_engine(module.model)  # every rank: full tensors of the anchor again, for the export
    train_seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"out_dir": str(out_dir), "steps": trainer.global_step,
                              "seconds": round(train_seconds, 1)}
    if guard.skipped:
        result["skipped_nonfinite_steps"] = list(guard.skipped)
    export_model = _merged_model(recipe, trainer, module)
    if trainer.is_global_zero:
        # never export a non-finite model (the guard checked the trained module; a merged bank is checked here)
        bad = first_nonfinite_weight(export_model)
        if bad is not None:
            raise FitError(f"{source}: the trained model holds a non-finite value in {bad}; it was not exported")
        model_dir = save_model_dir(export_model, recipe, index_dir, out_dir / "model",
                                   extra={"train": {"steps": trainer.global_step,
                                                    "seconds": round(train_seconds, 1)}})
        result["model_dir"] = str(model_dir)
        if final_eval and n_val:
            result["heldout_perplexity"] = _heldout(model_dir, export_model, index_dir, n_val, module.device, recipe,
                                                    progress, console)
        with atomic_write_path(out_dir / "fit_result.json") as tmp:
            # allow_nan=False: a NaN/inf (a perplexity that overflows) is written as null, never as NaN
            tmp.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    console.print(f"[bold]fit[/] done: {trainer.global_step} steps in {time.perf_counter() - t0:.1f} s -> "
                  f"{result.get('model_dir', out_dir)}")
    return result


def _build(recipe: Recipe, state: RunState, index_dir: Path, source: str, *,
           with_val: bool) -> tuple[HMLMModule, ShardDataModule]:
    """The model (with anchor.init_from), checked against the checkpoint to resume from, and the opened shards."""
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    try:
        # a resume restores (and reopens) the bank: drawing its initial values would be wasted time at scale
        model = build_model(recipe, index_vocab(index_dir), init_bank=state.resume is None)
    except ValueError as exc:
        raise FitError(f"{source}: {exc}") from None
    if recipe.anchor.init_from:
        try:
            init_anchor_from(model, recipe.anchor.init_from)
        except FitError as exc:
            raise FitError(f"{source}: {exc}") from None
    module = HMLMModule(recipe, model)
    if state.resume is not None:
        check_state_fits(state.resume, module, source)
    dm = ShardDataModule(index_dir, batch_size=recipe.trainer.batch_size, seed=recipe.seed,
                         num_workers=recipe.data.num_workers, val=with_val)
    try:  # open the shards now: an unreadable one is a clear error before training starts
        dm.setup("fit")
    except (OSError, ValueError) as exc:
        raise FitError(f"{str(exc).strip().splitlines()[0]}; rebuild the index (`hmlm index --recipe ... "
                       "--rebuild`)") from None
    except Exception as exc:  # safetensors' SafetensorError for a header it cannot parse
        raise FitError(f"{dm.index_dir / 'shards'}: cannot read a shard ({short_reason(exc)}); rebuild the index "
                       "(`hmlm index --recipe ... --rebuild`)") from None
    return module, dm


def _trainer(recipe: Recipe, state: RunState, first_callbacks: list[Any], run: RunDir | None, *, validate: bool,
             verify: bool, progress: bool, console: Console) -> L.Trainer:
    t, out_dir = recipe.trainer, Path(recipe.out_dir)
    # the newest keep_last step checkpoints are kept ("step" is a monitor Lightning always provides), plus last.ckpt
    ckpt_cb = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="step-{step:06d}", save_last=True,
                              every_n_train_steps=t.ckpt_every, save_top_k=t.keep_last, monitor="step", mode="max",
                              auto_insert_metric_name=False)
    # first_callbacks: the non-finite guard (before the checkpoint callback: it checks before anything is written)
    callbacks: list[Any] = [*first_callbacks, RecipeStamp(model_stamp(recipe)), ckpt_cb]
    if t.eval_every > 0:
        from ..eval.callback import BucketEvalCallback

        callbacks.append(BucketEvalCallback(every_n_steps=t.eval_every, tasks=t.eval_tasks, memory=t.eval_memory,
                                            limit=t.eval_limit, batch_size=t.batch_size))
    if progress:
        callbacks.append(StepProgressBar(leave=True))
    quiet_lightning_noise()
    segment = state.log_segment
    loggers: list[Any] = [CSVLogger(out_dir, name="logs", version=segment)]
    if _tensorboard_available():
        loggers.append(TensorBoardLogger(out_dir, name="logs", version=f"tb{('-' + segment) if segment else ''}"))
    else:
        console.print("[yellow]fit[/] tensorboard is not installed: logging to CSV only (pip install tensorboard)")
    strategy: Any = t.strategy
    precision = precision_for(recipe)
    on_saved = run.commit if run is not None else None
    if strategy == "ddp":
        from .ddp import build_ddp_strategy

        # trainer.ddp's buckets; under subtree it also runs a frozen anchor (DDP proper refuses a module it can't train)
        strategy = build_ddp_strategy(recipe)
    elif is_deepspeed(strategy):
        from .deepspeed import build_strategy, lightning_precision

        # checkpoint directories, checksummed and swapped in atomically by the strategy itself
        strategy = build_strategy(recipe, precision, on_saved=on_saved, verify=verify)
        precision = lightning_precision(precision)
    # checksummed checkpoints; the first one written lets a run replaced by --overwrite go (RunDir.commit)
    ckpt_io = ChecksummedCheckpointIO(verify=verify, on_saved=on_saved)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy, plugins=[ckpt_io],
        precision=precision, max_steps=t.max_steps, max_epochs=-1,
        val_check_interval=t.val_every if validate else None, check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches if validate else 0, num_sanity_val_steps=0,
        log_every_n_steps=t.log_every, callbacks=callbacks, logger=loggers,
        enable_progress_bar=progress, enable_model_summary=False, deterministic=False,
        use_distributed_sampler=False, default_root_dir=out_dir)


def _plan_subtrees(recipe: Recipe, index_dir: Path, trainer: L.Trainer, module: HMLMModule, dm: ShardDataModule,
                   console: Console) -> None:
    from .affine import SubtreePlanError, plan_for_recipe

    try:
        subtree = plan_for_recipe(recipe, index_dir, trainer.world_size)
    except SubtreePlanError as exc:
        raise FitError(str(exc)) from None
    module.subtree_plan = dm.subtree_plan = subtree
    console.print(f"[bold]fit[/] subtree-parallel: {subtree.summary()}")
    if trainer.world_size > 1 and trainer.limit_val_batches:
        # a rank holds only its own blocks, so it can't score other subtrees; the merged model is scored instead
        trainer.limit_val_batches = 0


def _merged_model(recipe: Recipe, trainer: L.Trainer, module: HMLMModule):
    """The model to export: the module's, or under subtree parallelism one full bank merged from every rank's."""
    if module.subtree_plan is None or trainer.world_size == 1 or not trainer.is_global_zero \
            or module.model.store is None:
        return module.model
    from ..bank.merge import merge_rank_banks, rank_dirs
    from ..model import build_store

    # every rank wrote its blocks to out_dir/ranks/ (HMLMModule.on_train_end)
    out_dir = Path(recipe.out_dir)
    full = merge_rank_banks(rank_dirs(out_dir), build_store(recipe, module.model.layout, init=False))
    return MemoryLM(module.model.anchor, module.model.layout, full)


def _heldout(model_dir: Path, model: MemoryLM, index_dir: Path, n_val: int, device, recipe: Recipe, progress: bool,
             console: Console) -> dict[str, float | None]:
    from ..eval.heldout_record import measurement_key, write_record
    from ..eval.perplexity import available_modes, leaf_nll, perplexities

    loaded = load_model_dir(model_dir, device=device, model=model)  # the model in memory: no re-read of the bank
    batch_size = recipe.trainer.batch_size
    count, nll = leaf_nll(loaded, index_dir, modes=available_modes(loaded), batch_size=batch_size, progress=progress)
    # kept beside model.json under the key of this measurement: `hmlm eval` of the same files reports it as is
    write_record(model_dir, measurement_key(loaded.meta, device=loaded.device, batch_size=batch_size,
                                            doc_mask=recipe.data.doc_mask), count, nll)
    ppl = perplexities(count, nll)
    table = Table(title=f"held-out perplexity ({n_val} sequences, {index_dir})")
    table.add_column("memory")
    table.add_column("perplexity", justify="right")
    for mode, value in ppl.items():
        table.add_row(mode, f"{value:.2f}")
    console.print(table)
    return {k: (v if math.isfinite(v) else None) for k, v in ppl.items()}

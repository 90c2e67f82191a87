"""Everything `hmlm fit` can check before it touches the disk, each failure one message naming the recipe file and key.

Order matters: `preflight` runs before the run directory is locked; `check_run_state` (the checkpoint to resume
from, or the refusal to overwrite a run) right after, once a killed run's leftovers are repaired; both before the
index is built and long before a previous run is moved aside, so a bad value, a missing path, an unavailable device
or a checkpoint that does not fit can never cost the user an existing run. The checks are cheap: no weights are
allocated (the model is built on the meta device), the Lightning Trainer is constructed once without a model to
validate accelerator/devices/precision, and a checkpoint is read memory-mapped (its checksum is hashed once and
remembered).
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import LEGACY_ANCHOR_KEYS, Recipe, RecipeError, move_legacy_anchor_keys, to_dict, validate
from ..index import fingerprint, read_index_meta, vocab_size_for
from .checkpoints import ResumePoint, checkpoint_problem, resolve_resume, sidecar_path, stamp_of
from .errors import FitError, short_reason
from .paths import bad_key, check_paths, readable
from .rundir import existing_run, refusal


def preflight(recipe: Recipe, *, source: str, verify: bool) -> None:
    """The recipe's values, paths, devices, model shapes and anchor.init_from; raises before anything is written."""
    validate(recipe, source)  # API callers may have built the recipe some other way
    check_paths(recipe, source)
    check_devices(recipe, source)
    check_model(recipe, source)
    check_init_from(recipe, source, verify=verify)


@dataclass
class RunState:
    resume: ResumePoint | None
    log_segment: str   # the logger version: "" for a new run, resume-<step>[-n] for a resumed segment


def check_run_state(recipe: Recipe, *, source: str, resume: bool | str, overwrite: bool, verify: bool,
                    primary: bool, command: str) -> RunState:
    """What is in out_dir against what was asked: the checkpoint to resume from (verified, and made by a run of the
    same model), or the refusal to start a new run over an existing one. Runs once the run dir is locked and what a
    killed run left there is repaired; reads only."""
    if resume and overwrite:
        raise FitError("--resume and --overwrite contradict each other: --resume continues the run in out_dir, "
                       "--overwrite replaces it")
    out_dir = Path(recipe.out_dir)
    point = None
    if resume:
        point = resolve_resume(out_dir, None if resume is True else str(resume), verify=verify, command=command)
        check_stamp(point, recipe, source)
    elif primary and not overwrite and (entries := existing_run(out_dir)):
        raise FitError(refusal(out_dir, entries, command))
    return RunState(point, _log_segment(out_dir, point))


# ---------------------------------------------------------------------------------------------------------- devices
def precision_for(recipe: Recipe) -> str:
    if recipe.trainer.precision != "auto":
        return recipe.trainer.precision
    return "bf16-mixed" if torch.cuda.is_available() and recipe.trainer.accelerator in ("auto", "gpu", "cuda") \
        else "32-true"


def check_devices(recipe: Recipe, source: str) -> None:
    t = recipe.trainer
    if t.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise bad_key(source, "trainer.accelerator", f"{t.accelerator!r} needs a CUDA GPU, but torch {torch.__version__} "
                                                  f"({build}) sees none; use trainer.accelerator=auto or cpu")
    if t.accelerator == "mps" and not torch.backends.mps.is_available():
        raise bad_key(source, "trainer.accelerator", "'mps' needs Apple-silicon MPS, which this machine does not have; "
                                                  "use trainer.accelerator=auto or cpu")
    from ..config import DEEPSPEED_STRATEGIES

    if t.strategy in DEEPSPEED_STRATEGIES:
        from .deepspeed import check_available

        check_available(recipe, source)
    import lightning as L

    # Lightning validates the combination of accelerator, devices, strategy and precision when a Trainer is built;
    # building one without a model does nothing else (its device banner is silenced: the real Trainer prints it)
    banner = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = banner.level
    banner.setLevel(logging.WARNING)
    try:
        L.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
                  precision=precision_for(recipe),
                  logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  max_steps=1)
    except Exception as exc:  # MisconfigurationException, ValueError, RuntimeError: Lightning's own explanation
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"{source}: keys `trainer.accelerator`={t.accelerator!r}, `trainer.devices`={t.devices!r}, "
                          f"`trainer.strategy`={t.strategy!r}, `trainer.precision`={t.precision!r}, "
                          f"`trainer.num_nodes`={t.num_nodes!r} do not work "
                          f"here: {first}") from None
    finally:
        banner.setLevel(level)


# ------------------------------------------------------------------------------------------------------------ model
def check_model(recipe: Recipe, source: str) -> None:
    """Build the anchor and bank layout on the meta device: presets, shapes, placement and plugins, no allocation."""
    from ..model import build_anchor, build_layout
    from ..registry import PluginError

    index_meta = Path(recipe.index.dir) / "index.json"
    # the real vocabulary when the index exists; otherwise a small stand-in (the real one is checked after indexing)
    vocab = vocab_size_for(recipe) if index_meta.is_file() or recipe.anchor.vocab_size else 64
    try:
        anchor = build_anchor(recipe, vocab, device="meta")
        build_layout(recipe, anchor)
    except (RecipeError, ValueError, TypeError, KeyError, PluginError) as exc:
        # plugins name the key at the start of their message ("anchor.options.model_type: the hf anchor needs ...")
        text = re.sub(r"^([a-z_]+(?:\.[a-z_0-9]+)+): ", r"key `\1`: ", str(exc).strip("'\""))
        raise RecipeError(f"{source}: {text}") from None


def check_init_from(recipe: Recipe, source: str, *, verify: bool) -> None:
    if not recipe.anchor.init_from:
        return
    key, src = "anchor.init_from", Path(recipe.anchor.init_from)
    if not src.exists():
        raise bad_key(source, key, f"{src} does not exist (give a model directory, a .ckpt file or, for anchor.name=hf, "
                                "a local Hugging Face checkpoint directory)")
    if src.is_dir():
        if (src / "model.json").is_file() and verify:
            from ..export import ModelDirError, verify_model_files
            from ..utils import read_json_artifact

            try:
                meta = read_json_artifact(src / "model.json", ModelDirError, missing="no model.json")
                verify_model_files(src, meta, only=["anchor.safetensors"])
            except ModelDirError as exc:
                raise bad_key(source, key, f"{exc} (or pass --no-verify)") from None
        files = [f for f in (src / "anchor.safetensors", src / "config.json") if f.exists()]
    else:
        if verify and sidecar_path(src).is_file() and (problem := checkpoint_problem(src)) is not None:
            raise bad_key(source, key, f"{src}: {problem}")
        files = [src]
    for f in files:
        readable(source, key, f)
        try:  # the headers only: a memory-mapped torch load, or the safetensors header
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="pt") as h:
                    h.keys()
            elif f.name != "config.json":
                try:
                    torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc):
                        raise
                    torch.load(f, map_location="cpu", weights_only=True)  # a legacy (pre-zip) torch file
        except Exception as exc:
            raise bad_key(source, key, f"cannot read {f} as weights ({short_reason(exc)})") from None


# ------------------------------------------------------------------------------------------------------- checkpoint
def model_stamp(recipe: Recipe) -> dict[str, Any]:
    """The recipe keys a checkpoint's tensors and data order depend on (training-only keys such as lr, max_steps or
    batch_size may change on --resume)."""
    d = to_dict(recipe)
    stamp = anchor_stamp(d["anchor"])
    stamp.update({f"memory.{k}": d["memory"][k] for k in ("type", "sizes", "placement", "generic", "dtype")})
    stamp.update({"index.router.branching": recipe.index.router.branching,
                  "index.router.levels": recipe.index.router.levels, "data.seq_len": recipe.data.seq_len,
                  "trainer.mode": recipe.trainer.mode, "index.fingerprint": fingerprint(recipe)})
    return stamp


def anchor_stamp(anchor: dict[str, Any]) -> dict[str, Any]:
    """The anchor's stamp keys: the core's (`anchor.name`, `anchor.vocab_size`) and every option of the anchor plugin
    with its defaults filled in (`anchor.options.n_layers`), so a recipe that spells out a default stamps like one
    that leaves it out. The older schema's keys (`anchor.n_layers`) are read as options, as in a recipe."""
    from ..plugin_config import parse_options
    from ..registry import PluginError, get

    anchor = {k: v for k, v in anchor.items() if k != "init_from"}
    move_legacy_anchor_keys({"anchor": anchor}, "checkpoint stamp")
    options = dict(anchor.pop("options", None) or {})
    try:
        typed = parse_options(get("anchors", anchor.get("name")), options, source="checkpoint stamp",
                              key="anchor.options")
    except (PluginError, RecipeError):
        typed = None   # an anchor not installed here or options it refuses: compared as written
    if typed is not None:
        options = asdict(typed)
    return {**{f"anchor.{k}": v for k, v in anchor.items()}, **{f"anchor.options.{k}": v for k, v in options.items()}}


def _current_stamp(stamp: dict[str, Any]) -> dict[str, Any]:
    """A stamp written before the anchors owned their options (flat `anchor.preset`, `anchor.options` as one
    mapping) in today's keys, so such a checkpoint still resumes with today's recipe."""
    flat = {k.removeprefix("anchor."): v for k, v in stamp.items()
            if k.startswith("anchor.") and not k.startswith("anchor.options.")}
    if not flat.keys() & (set(LEGACY_ANCHOR_KEYS) | {"options"}):
        return stamp
    return {**{k: v for k, v in stamp.items() if not k.startswith("anchor.")}, **anchor_stamp(flat)}


def check_stamp(point: ResumePoint, recipe: Recipe, source: str) -> None:
    stamp = stamp_of(point.ckpt)
    if stamp is None:
        return  # a checkpoint from before stamps: its tensors are compared with the model once it is built
    stamp = _current_stamp(stamp)
    mine = model_stamp(recipe)
    diff = [k for k in sorted(set(stamp) | set(mine)) if stamp.get(k) != mine.get(k)]
    if diff:
        shown = "; ".join(f"`{k}` is {stamp.get(k)!r} there, {mine.get(k)!r} here" for k in diff[:4])
        what = ("the index was built from other data/index settings" if diff == ["index.fingerprint"] else shown)
        raise FitError(f"{point.path}: this checkpoint was written by a run with another recipe than {source} "
                       f"({what}); resume with the recipe it was trained with, or start a new run (another out_dir, "
                       "or --overwrite)")


def check_state_fits(point: ResumePoint, module: torch.nn.Module, source: str) -> None:
    """The checkpoint's tensors have this model's names and shapes (for checkpoints without a recipe stamp)."""
    theirs = point.ckpt.get("state_dict") or {}
    mine = module.state_dict()
    missing = sorted(set(mine) - set(theirs))
    extra = sorted(set(theirs) - set(mine))
    shapes = [k for k in sorted(set(mine) & set(theirs))
              if hasattr(theirs[k], "shape") and tuple(theirs[k].shape) != tuple(mine[k].shape)]
    if missing or extra or shapes:
        detail = (f"tensor {shapes[0]} is {tuple(theirs[shapes[0]].shape)} there, {tuple(mine[shapes[0]].shape)} here"
                  if shapes else f"{'missing ' + missing[0] if missing else 'unexpected ' + extra[0]}")
        raise FitError(f"{point.path}: this checkpoint does not fit the model of {source} ({detail}); it was written "
                       "by a run with another recipe: resume with that recipe, or start a new run")


def _log_segment(out_dir: Path, point: ResumePoint | None) -> str:
    """A resumed segment logs beside the earlier ones; resuming twice from one step must not overwrite a log."""
    if point is None:
        return ""
    base = f"resume-{point.step:06d}"
    name, n = base, 1
    while (out_dir / "logs" / name).exists() or (out_dir / "logs" / f"tb-{name}").exists():
        n += 1
        name = f"{base}-{n}"
    return name


def index_vocab(index_dir: Path) -> int:
    from ..data.tokenizer import padded_vocab_size

    return padded_vocab_size(read_index_meta(index_dir)["tokenizer"]["vocab_size"])

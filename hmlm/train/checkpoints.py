"""Checkpoints that can be trusted, and choosing the one to resume from.

Integrity lives at the file level, independent of what a checkpoint holds (the bank's layout inside it may change):
`ChecksummedCheckpointIO` serialises a checkpoint in memory (as Lightning's own writer does), hashes those bytes,
writes them to a temp file that is fsynced and renamed onto `<name>.ckpt`, then writes `<name>.ckpt.sha256`
(`sha256sum -c` format) the same way. Every load verifies the sidecar first, so a checkpoint with flipped bytes is
refused before torch reads it. A kill between the two renames leaves a new checkpoint beside its old sidecar: it
reads as corrupt, and `--resume` falls back to the newest checkpoint that verifies (the same step: Lightning writes
step-*.ckpt before last.ckpt).

DeepSpeed writes a checkpoint as a directory `<name>.ckpt/` (one file per rank's shard; hmlm.train.deepspeed). Its
sidecar `<name>.ckpt.sha256` lists every file inside (`<name>.ckpt/<relative path>`, so `sha256sum -c` works from
the checkpoints folder), and a directory verifies only when its files are exactly the listed ones with the listed
hashes. The strategy swaps the finished directory in with one rename before writing the sidecar, so the same
fallback applies.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..utils import atomic_write_path, sha256_file
from .errors import FitError, short_reason

SIDECAR = ".sha256"
_STEP_FILE = re.compile(r"step-(\d+)(?:-v\d+)?\.ckpt")


def sidecar_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + SIDECAR)


def write_checkpoint_bytes(path: Path, data: bytes | memoryview) -> None:
    """The checkpoint file, then its checksum file; each written to a temp file, fsynced and renamed."""
    path = Path(path)
    digest = hashlib.sha256(data).hexdigest()
    with atomic_write_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    with atomic_write_path(sidecar_path(path)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{digest}  {path.name}\n")
            f.flush()
            os.fsync(f.fileno())
    _verified[str(path)] = _stat_key(path)


def _dir_files(path: Path) -> list[Path]:
    return sorted(f for f in Path(path).rglob("*") if f.is_file())


def write_dir_sidecar(path: Path) -> None:
    """The sidecar of a checkpoint directory: one `sha256  <dir>/<file>` line per file, written atomically."""
    path = Path(path)
    lines = [f"{sha256_file(f)}  {path.name}/{f.relative_to(path).as_posix()}\n" for f in _dir_files(path)]
    with atomic_write_path(sidecar_path(path)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
    _verified[str(path)] = _stat_key(path)


def _dir_problem(path: Path, side: Path) -> str | None:
    listed: dict[str, str] = {}
    for line in side.read_text(encoding="utf-8", errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    present = {f"{path.name}/{f.relative_to(path).as_posix()}": f for f in _dir_files(path)}
    if not listed:
        return f"{side.name} lists no files"
    if missing := sorted(set(listed) - set(present)):
        return f"{missing[0]} is missing (listed in {side.name})"
    if extra := sorted(set(present) - set(listed)):
        return f"{extra[0]} is not listed in {side.name}: the checkpoint was modified"
    for name, f in present.items():
        if sha256_file(f) != listed[name]:
            return f"checksum mismatch of {name} with {side.name}: the file is corrupt or was modified"
    return None


# path -> (size, mtime_ns) of checkpoints this process wrote or verified, so a load right after the pre-flight
# check does not hash a multi-GB file twice
_verified: dict[str, tuple[int, int, int]] = {}


def _stat_key(path: Path) -> tuple[int, int, int]:
    side = sidecar_path(path).stat()
    if path.is_dir():
        stats = [f.stat() for f in _dir_files(path)]
        return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0), side.st_mtime_ns
    st = path.stat()
    return st.st_size, st.st_mtime_ns, side.st_mtime_ns


def checkpoint_problem(path: Path) -> str | None:
    """None when `path` matches its sidecar; otherwise why it cannot be trusted."""
    path = Path(path)
    side = sidecar_path(path)
    try:
        if not side.is_file():
            return (f"no checksum file {side.name} (written before hmlm checked checkpoints, or by another tool); "
                    "pass --no-verify to trust it")
        if _verified.get(str(path)) == _stat_key(path):
            return None
        if path.is_dir():
            problem = _dir_problem(path, side)
            if problem is None:
                _verified[str(path)] = _stat_key(path)
            return problem
        words = side.read_text(encoding="utf-8", errors="replace").split()
        expected = words[0] if words else ""
        actual = sha256_file(path)
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    if actual != expected:
        return f"checksum mismatch with {side.name}: the file is corrupt or was modified"
    _verified[str(path)] = _stat_key(path)
    return None


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's contents without loading its tensors (mmap); a clear error for a foreign or broken file.
    For a DeepSpeed directory: the Lightning entries DeepSpeed stores beside rank 0's model states."""
    if Path(path).is_dir():
        return _deepspeed_meta(Path(path))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip, pickle of arbitrary objects refused by weights_only, ...
        raise FitError(f"{path}: cannot read this checkpoint ({short_reason(exc)}); it is corrupt or was not written "
                       "by hmlm fit") from None
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise FitError(f"{path}: not a Lightning checkpoint written by hmlm fit (no global_step)")
    return ckpt


def _deepspeed_meta(path: Path) -> dict[str, Any]:
    """DeepSpeed keeps Lightning's checkpoint dict (minus state_dict/optimizer_states) as `client_state` in
    `<tag>/*model_states.pt`, next to its own entries; `module` holds the weights (ZeRO 1/2; a stub under ZeRO-3)."""
    tag_file = path / "latest"
    tag = tag_file.read_text(encoding="utf-8").strip() if tag_file.is_file() else "checkpoint"
    states = sorted((path / tag).glob("*model_states.pt"))
    if not states:
        raise FitError(f"{path}: a directory, but not a checkpoint written by hmlm fit under DeepSpeed (no "
                       f"{tag}/*model_states.pt)")
    try:
        ckpt = torch.load(states[0], map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise FitError(f"{states[0]}: cannot read this checkpoint ({short_reason(exc)}); it is corrupt or was not "
                       "written by hmlm fit") from None
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise FitError(f"{path}: not a Lightning checkpoint written by hmlm fit (no global_step)")
    module = ckpt.get("module")
    if isinstance(module, dict) and module and not ckpt.get("param_shapes_partitioned", False) \
            and "zero_pp_rank" not in states[0].name:
        ckpt["state_dict"] = module
    return ckpt


class ChecksummedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer/reader with a verified sha256 sidecar per file (see the module docstring).

    `on_saved(path)` runs after a checkpoint and its sidecar are both in place (fit uses it to drop a run that
    `--overwrite` moved aside, once the new run has a checkpoint of its own).
    """

    def __init__(self, *, verify: bool = True, on_saved: Callable[[Path], None] | None = None):
        super().__init__()
        self.verify = verify
        self.on_saved = on_saved

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_checkpoint_bytes(Path(path), buffer.getbuffer())
        if self.on_saved is not None:
            self.on_saved(Path(path))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if self.verify and (problem := checkpoint_problem(Path(path))) is not None:
            raise FitError(f"{path}: {problem}")
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=weights_only, **kwargs)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        sidecar_path(Path(path)).unlink(missing_ok=True)
        _verified.pop(str(path), None)


# --------------------------------------------------------------------------------------------- choosing a checkpoint
@dataclass
class ResumePoint:
    path: Path
    step: int
    ckpt: dict[str, Any]
    skipped: list[str] = field(default_factory=list)      # "<file>: why" for newer checkpoints passed over
    supersede: list[Path] = field(default_factory=list)   # this run's checkpoints newer than `path` (or unreadable)


def file_step(path: Path) -> int | None:
    m = _STEP_FILE.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def _is_checkpoint(path: Path) -> bool:
    """A Lightning checkpoint file, or a DeepSpeed checkpoint directory (`latest` names its tag)."""
    return path.is_file() or (path.is_dir() and (path / "latest").is_file())


def run_checkpoints(ckpt_dir: Path) -> list[Path]:
    """last.ckpt and step-*.ckpt of a run, newest first by the step in their names (last.ckpt leads)."""
    if not ckpt_dir.is_dir():
        return []
    steps = sorted((p for p in ckpt_dir.iterdir() if _is_checkpoint(p) and file_step(p) is not None),
                   key=lambda p: (file_step(p), p.name), reverse=True)
    last = [p for p in ckpt_dir.glob("last*.ckpt") if _is_checkpoint(p)]
    return sorted(last, key=lambda p: p.name) + steps


def _usable(path: Path, verify: bool) -> tuple[dict[str, Any] | None, str | None]:
    problem = checkpoint_problem(path) if verify else None
    if problem is not None:
        return None, problem
    try:
        return checkpoint_meta(path), None
    except FitError as exc:
        return None, str(exc).split(": ", 1)[-1]


def resolve_resume(out_dir: Path, name: str | None, *, verify: bool, command: str) -> ResumePoint:
    """The checkpoint `--resume [name]` continues from: the named one (a file name in <out_dir>/checkpoints or a
    path), or the newest one that verifies. `command` is the fit command line, for the advice in errors."""
    ckpt_dir = Path(out_dir) / "checkpoints"
    found = run_checkpoints(ckpt_dir)
    if name is not None:
        path = Path(name) if _is_checkpoint(Path(name)) else ckpt_dir / name
        if not _is_checkpoint(path):
            listing = ", ".join(p.name for p in found) or "none"
            raise FitError(f"--resume {name}: no such checkpoint (looked for {Path(name)} and {ckpt_dir / name}); "
                           f"checkpoints of this run: {listing}")
        ckpt, problem = _usable(path, verify)
        if ckpt is None:
            raise FitError(f"{path}: {problem}. {_alternatives(found, path, verify, command)}")
        step = int(ckpt["global_step"])
        # newer ones, and a last.ckpt that fails verification (this run rewrites last.ckpt; keep the old bytes aside)
        newer = [p for p in found if p.resolve() != path.resolve() and (
            _is_newer(p, step) or (verify and p.name.startswith("last") and checkpoint_problem(p) is not None))]
        return ResumePoint(path, step, ckpt, supersede=newer)
    if not found:
        raise FitError(f"--resume: no checkpoint in {ckpt_dir}; start without --resume")
    skipped: list[str] = []
    best: tuple[int, Path, dict[str, Any]] | None = None
    for path in found:
        fstep = file_step(path)
        if best is not None and fstep is not None and fstep <= best[0]:
            break  # step files are newest first: nothing later can beat what we have
        ckpt, problem = _usable(path, verify)
        if ckpt is None:
            skipped.append(f"{path.name}: {problem}")
            continue
        step = int(ckpt["global_step"])
        if best is None or step > best[0]:
            best = (step, path, ckpt)
    if best is None:
        raise FitError(f"--resume: no checkpoint in {ckpt_dir} can be used ({'; '.join(skipped)}); start over with "
                       f"`{command} --overwrite` (the current run is moved aside, not deleted)")
    step, path, ckpt = best
    supersede = [p for p in found if p != path and (any(s.startswith(p.name + ":") for s in skipped)
                                                     or _is_newer(p, step))]
    return ResumePoint(path, step, ckpt, skipped=skipped, supersede=supersede)


def _is_newer(path: Path, step: int) -> bool:
    fstep = file_step(path)
    if fstep is not None:
        return fstep > step
    try:  # last.ckpt: its step is inside
        return int(checkpoint_meta(path)["global_step"]) > step
    except FitError:
        return True  # unreadable: it will be rewritten by this run, so keep the old bytes aside


def _alternatives(found: list[Path], bad: Path, verify: bool, command: str) -> str:
    for path in found:
        if path == bad:
            continue
        ckpt, _ = _usable(path, verify)
        if ckpt is not None:
            return (f"The newest checkpoint that verifies is {path.name} (step {int(ckpt['global_step'])}): resume "
                    f"from it with `{command} --resume {path.name}` (newer checkpoints are moved aside, not deleted)")
    return (f"No other checkpoint of this run verifies; start over with `{command} --overwrite` (the current run is "
            "moved aside, not deleted)")


# --------------------------------------------------------------------------------------- the recipe a checkpoint fits
class RecipeStamp(Callback):
    """Records, inside every checkpoint, the recipe keys that decide the model's shapes and data, so `--resume` with
    another recipe is refused up front with the differing key named (instead of a state-dict traceback)."""

    def __init__(self, stamp: dict[str, Any]):
        self.stamp = stamp

    def state_dict(self) -> dict[str, Any]:
        return {"model_keys": self.stamp}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # compared before training starts (hmlm.train.preflight), not here


def stamp_of(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    for key, state in (ckpt.get("callbacks") or {}).items():
        if str(key).startswith(RecipeStamp.__qualname__) and isinstance(state, dict):
            return state.get("model_keys")
    return None

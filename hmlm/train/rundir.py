"""The run directory (`out_dir`) of one `hmlm fit`: an exclusive lock, the previous run, interrupted writes.

* **Lock.** `<out_dir>/.hmlm.lock` is flock(2)-ed exclusively for the whole fit and names the holder (pid, host,
  start time). A second fit on the same out_dir refuses (exit 2) while the first runs. The kernel drops the lock
  when its process dies, so a lock file that still names a holder when we get the lock was left by a killed run: we
  take it over, say so, and finish what that run left half-done (below).
* **Previous run.** A fresh fit over a directory holding a run refuses unless `--overwrite`; then the old run's
  entries are moved (renamed, same file system) into `<out_dir>/.previous-<time>/` and deleted only once the new
  run has written its first verified checkpoint. If the new run fails or is interrupted before that, the old run is
  moved back and the new run's partial logs are removed: an accidental `--overwrite` costs nothing. The lock file
  records the move, so a `kill -9` in that window is repaired by the next fit on the directory.
* **Interrupted writes.** `.<name>.*.tmp` and `.<name>.old` left by atomic writes that were killed are removed (or,
  for an `.old` whose target is missing, moved back) once we hold the lock, so none can belong to a live writer.

Only the primary process (global rank 0) does any of this; the other ranks of a data-parallel run start after it.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from ..utils import FileLock, describe_holder, recover_atomic_dir
from .checkpoints import checkpoint_problem, run_checkpoints
from .errors import FitError

LOCK_NAME = ".hmlm.lock"
# what a fit writes into out_dir (the index is an input, checked by its fingerprint, and stays where it is)
RUN_ENTRIES = ("checkpoints", "logs", "model", "ranks", "eval", "fit_result.json", "recipe.yaml")
# entries whose presence means "a run lives here" (a recipe.yaml alone is what a fit that failed early leaves)
_RUN_MARKERS = ("checkpoints", "logs", "model", "ranks", "fit_result.json")


def is_primary_process() -> bool:
    """False in the other ranks of a data-parallel run (torchrun, Lightning's launcher, SLURM)."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "0") not in ("", "0"):
            return False
    return True


def existing_run(out_dir: Path) -> list[str]:
    """The entries of `out_dir` that hold a previous run (empty when there is none)."""
    out_dir = Path(out_dir)
    found = []
    for name in _RUN_MARKERS:
        p = out_dir / name
        if p.is_file() or (p.is_dir() and any(p.iterdir())):
            found.append(name)
    return found


def describe_run(out_dir: Path, entries: list[str]) -> str:
    ckpts = [p.name for p in run_checkpoints(Path(out_dir) / "checkpoints")]
    what = ", ".join(f"{e}/" if (Path(out_dir) / e).is_dir() else e for e in entries)
    newest = f"; newest checkpoints: {', '.join(ckpts[:3])}" if ckpts else ""
    return f"{what}{newest}"


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


class RunDir:
    """Held for the duration of one fit: `lock()` locks and repairs, `move_aside()` (--overwrite) right before
    training, `commit()` after the first checkpoint, `close(failed)` releases (moving the previous run back when the
    new one failed before writing any checkpoint)."""

    def __init__(self, out_dir: Path, console: Console, *, command: str = "hmlm fit"):
        self.out_dir = Path(out_dir)
        self.console = console
        self.command = command
        self.lock_file = FileLock(self.out_dir / LOCK_NAME)
        self.previous: Path | None = None   # where --overwrite moved the old run, until commit
        self.committed = False
        self._also: tuple[str, ...] = ()   # entries moved aside besides RUN_ENTRIES (move_aside's `also`)
        self._info: dict[str, Any] = {}

    # ------------------------------------------------------------------ lock
    def lock(self, *, keep: tuple[str, ...] = ()) -> None:
        """Lock out_dir and repair what a killed fit left there. `keep`: names in out_dir that are not this run's to
        clean (the index when it lives there: it has its own lock)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not self.lock_file.acquire():
            holder = self.lock_file.holder()
            self.lock_file.release()
            raise FitError(f"{self.out_dir}: key `out_dir` is in use by a running fit ({describe_holder(holder)}); "
                           "wait for it to finish, or give this run another out_dir")
        try:
            stale = self.lock_file.holder()
            self._info = {"command": self.command}
            self.lock_file.write(self._info)
            if stale:
                self._take_over(stale)
            self._clean_interrupted_writes(keep)
        except BaseException:
            self.lock_file.release()
            raise

    def _take_over(self, stale: dict[str, Any]) -> None:
        self.console.print(f"[yellow]fit[/] taking over a stale lock on {self.out_dir}: {describe_holder(stale)} "
                           "ended without releasing it (killed?)")
        prev = stale.get("previous")
        if prev and (self.out_dir / prev).is_dir():
            if any(checkpoint_problem(p) is None for p in run_checkpoints(self.out_dir / "checkpoints")):
                shutil.rmtree(self.out_dir / prev)
                self.console.print(f"[yellow]fit[/] the killed run had written a checkpoint: removed the run it "
                                   f"replaced ({prev})")
            else:
                self.previous = self.out_dir / prev
                self._also = tuple(stale.get("also", ()))
                self._restore(discard_new=stale.get("phase") != "moving")
                self.console.print(f"[yellow]fit[/] the killed run had written no checkpoint: moved the run it "
                                   f"replaced back from {prev}")

    def _clean_interrupted_writes(self, keep: tuple[str, ...]) -> None:
        notes: list[str] = []
        for directory in (self.out_dir, self.out_dir / "checkpoints", self.out_dir / "ranks"):
            if not directory.is_dir():
                continue
            targets = set()
            for p in directory.iterdir():
                name = p.name
                if name.startswith(".") and name.endswith(".old"):
                    targets.add(name[1:-len(".old")])
                elif name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3:
                    targets.add(name[1:-len(".tmp")].rsplit(".", 1)[0])
            for target in sorted(targets - set(keep)):
                notes += recover_atomic_dir(directory / target)
        for note in notes:
            self.console.print(f"[yellow]fit[/] {note}")

    def move_aside(self, *, also: tuple[str, ...] = ()) -> None:
        """--overwrite, right before the new run starts training: the previous run's entries go to .previous-<time>.

        `also`: more names in out_dir that belong to the previous run (its index when this run needs another one,
        moved before the new index is built): they come back with it if the new run fails, and are removed with it
        otherwise. A second call (after an early one with `also`) does nothing."""
        if self.previous is not None:
            return
        also = tuple(e for e in also if (self.out_dir / e).exists())
        entries = [e for e in RUN_ENTRIES if (self.out_dir / e).exists()] + list(also)
        if not existing_run(self.out_dir) and not also:
            return
        name = f".previous-{_timestamp()}"
        n = 0
        while (self.out_dir / name).exists():
            n += 1
            name = f".previous-{_timestamp()}-{n}"
        self.previous = self.out_dir / name
        self._also = also
        self._info.update(previous=name, phase="moving", **({"also": list(also)} if also else {}))
        self.lock_file.write(self._info)  # recorded before the first rename: a kill mid-way is repaired by the next fit
        self.previous.mkdir()
        for entry in entries:
            os.replace(self.out_dir / entry, self.previous / entry)
        self._info["phase"] = "moved"
        self.lock_file.write(self._info)
        self.console.print(f"[yellow]fit[/] --overwrite: the previous run is kept in {self.previous} until this run "
                           "writes its first checkpoint (it is moved back if this run fails before that)")

    # ------------------------------------------------------------------ during and after training
    def supersede(self, paths: list[Path]) -> None:
        """Move checkpoints newer than the one resumed from (or unreadable) into checkpoints/.superseded-<time>/:
        this run will write its own at those steps, and a later --resume must not pick the abandoned ones."""
        paths = [p for p in paths if p.exists()]
        if not paths:
            return
        dest = self.out_dir / "checkpoints" / f".superseded-{_timestamp()}"
        dest.mkdir(parents=True, exist_ok=True)
        for p in paths:
            for f in (p, p.with_name(p.name + ".sha256")):
                if f.exists():
                    os.replace(f, dest / f.name)
        self.console.print(f"[yellow]fit[/] moved {', '.join(p.name for p in paths)} (newer than the checkpoint "
                           f"resumed from, or unreadable) to {dest}")

    def commit(self, checkpoint: Path | None = None) -> None:
        """The new run has a verified checkpoint: the run it replaced can go."""
        if self.committed:
            return
        self.committed = True
        if self.previous is not None and self.previous.exists():
            shutil.rmtree(self.previous)
            self.console.print(f"[yellow]fit[/] first checkpoint written: removed the previous run ({self.previous})")
        self.previous = None
        self._forget_previous()

    def close(self, *, failed: bool) -> None:
        try:
            if failed and not self.committed and self.previous is not None and self.previous.exists():
                self._restore(discard_new=True)
                self.console.print(f"[yellow]fit[/] this run failed before its first checkpoint: the previous run is "
                                   f"back in {self.out_dir}")
        finally:
            self.lock_file.release()

    def _restore(self, *, discard_new: bool) -> None:
        """Move the previous run back. With `discard_new`, the run entries now in out_dir are the failed run's (the old
        ones were all moved before it started) and are removed first; without it (a kill while moving) nothing in
        out_dir is new, so only the entries that were already moved are brought back."""
        assert self.previous is not None
        if discard_new:
            for entry in (*RUN_ENTRIES, *self._also):
                p = self.out_dir / entry
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
        for p in sorted(self.previous.iterdir()):
            if not (self.out_dir / p.name).exists():
                os.replace(p, self.out_dir / p.name)
        shutil.rmtree(self.previous, ignore_errors=True)
        self.previous = None
        self._forget_previous()

    def _forget_previous(self) -> None:
        self._also = ()
        for key in ("previous", "phase", "also"):
            self._info.pop(key, None)
        if self.lock_file.held:
            self.lock_file.write(self._info)


def refusal(out_dir: Path, entries: list[str], command: str) -> str:
    return (f"{out_dir}: key `out_dir` holds a previous run ({describe_run(out_dir, entries)}); continue it with "
            f"`{command} --resume`, start over with `{command} --overwrite` (the old run is moved aside and deleted "
            "only once the new run has written its first checkpoint), or set out_dir to another directory")

"""Small helpers shared across the package: atomic writes (and recovering from interrupted ones), advisory file locks,
checksums (and verifying them), versions."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator


def passive_openmp() -> None:
    """Idle OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE), unless the environment chose a policy.
    OpenMP reads it when torch loads it, so a command calls this before importing torch. On a 2-core machine that
    other processes share, a spinning thread holds the core its partner needs: `hmlm eval`'s lm-eval tasks ran 5x
    slower with the default policy (docs/benchmarks.md, "hmlm eval on a shared 2-core CPU")."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep and reuse freed memory instead of handing it back to the kernel at once.

    A CPU training step allocates the same tens of MB of temporaries every step (activations, the memory's per-sample
    blocks and their gradients, the bank update's rows). By default glibc maps each allocation above a dynamic
    threshold afresh and unmaps it when freed, and trims the heap's top, so every step page-faults its temporaries in
    again: about half a million page faults in 13 quickstart steps. With the mmap threshold fixed at 32 MiB (glibc's
    maximum) and no trimming, they come from the heap and stay mapped: the faults halve (docs/benchmarks.md; the
    step's wall time moved within the noise of the shared host it was measured on). Allocations above 32 MiB (a
    host-tier bank) are still mapped on their own, and the environment's MALLOC_*_ settings win. Returns whether the
    settings were applied (glibc only)."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False   # not glibc (musl, ...): nothing to tune
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20)))


def _process_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any thread could be writing files
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()
FILE_MODE = 0o666 & ~_UMASK   # what open(path, "w") gives: 0644 under the usual umask
DIR_MODE = 0o777 & ~_UMASK    # what mkdir gives: 0755


def _plain_modes(root: Path) -> None:
    """Give every file and folder under `root` the mode a plain open()/mkdir would: writers such as mkstemp and
    safetensors create 0600 files, which would lock other users of a shared run folder out of the artifacts."""
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, DIR_MODE)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), FILE_MODE)


@contextlib.contextmanager
def atomic_write_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds.

    The file gets the mode a plain `open(path, "w")` would give (0644 under the usual umask), whatever wrote it:
    mkstemp and safetensors create 0600, which would make artifacts unreadable to other users of a run folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temp directory beside `path`; it replaces `path` only if the block succeeds. Everything in it gets
    the mode of a plain `open`/`mkdir` (0644 files, 0755 folders under the usual umask), not mkdtemp's 0700 or the
    0600 of files that safetensors writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _plain_modes(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_atomic_dir(path: Path) -> list[str]:
    """Finish or undo what an `atomic_dir(path)` killed half-way left behind; returns one note per action.

    Call it only while holding the lock that guards `path` (a live writer's temp dir looks just like a dead one's).
    `.<name>.old` beside a missing `path` is the previous content moved aside by a swap that never completed: it is
    moved back, never deleted. `.<name>.*.tmp` are unfinished new contents: they are removed.
    """
    path = Path(path)
    notes: list[str] = []
    if not path.parent.is_dir():
        return notes
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            notes.append(f"removed {old} (left by an interrupted replace of {path.name})")
        else:
            os.replace(old, path)
            notes.append(f"restored {path} from {old.name} (an interrupted replace had moved it aside)")
    for tmp in sorted(path.parent.glob(f".{path.name}.*.tmp")):
        shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
        notes.append(f"removed {tmp} (an unfinished write of {path.name})")
    return notes


class FileLock:
    """An advisory flock(2) on `path` (created if missing). The kernel drops it when the process dies, so a lock
    whose file still names a holder after `acquire` succeeded was left by a process that was killed (`stale`).

    The exclusive holder writes {pid, host, started, ...} into the file so a refused process can say who holds it;
    a clean release empties the file again (the file itself stays: unlinking a lock file races with openers).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None
        self._locked = False
        self._wrote = False
        self._started = ""

    def acquire(self, *, shared: bool = False, blocking: bool = False) -> bool:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(self._fd, flags)
        except BlockingIOError:
            return False
        if not self._locked:
            self._started = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._locked = True
        return True

    @property
    def held(self) -> bool:
        return self._locked

    def holder(self) -> dict[str, Any]:
        """What the (last) exclusive holder wrote; {} when nothing or garbage."""
        try:
            raw = self.path.read_text(encoding="utf-8")
            info = json.loads(raw) if raw.strip() else {}
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def write(self, info: dict[str, Any]) -> None:
        assert self._fd is not None and self._locked, "acquire the lock first"
        data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": self._started, **info}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)
        self._wrote = True

    def release(self) -> None:
        if self._fd is None:
            return
        if self._wrote and self._locked:
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd, self._locked, self._wrote = None, False, False


def describe_holder(info: dict[str, Any]) -> str:
    if not info:
        return "another hmlm process"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (since {info.get('started', '?')})"


def read_json_artifact(path: Path, error: type[Exception], *, missing: str, corrupt_hint: str = "") -> Any:
    """Read an artifact's JSON metadata, turning a missing or corrupt file into `error` that names the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path.parent}: {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: corrupt JSON ({exc}){corrupt_hint}") from None


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 text to `path` atomically (atomic_write_path): readers see the old file or the whole new one."""
    with atomic_write_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 20, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return h.hexdigest()


def verify_checksums(root: Path, checksums: dict[str, str], error: type[Exception], *, listed_in: Path,
                     fix: str, progress: bool = True, show_after_s: float = 1.5) -> None:
    """Hash every file of `checksums` (relative to `root`) and raise `error` naming the first missing or differing
    file. A transient progress bar appears only when hashing takes longer than `show_after_s`."""
    root = Path(root)
    files = []
    for rel, expected in sorted(checksums.items()):
        f = root / rel
        if not f.is_file():
            raise error(f"{f}: missing file listed in {listed_in}; {fix}")
        files.append((f, expected))
    total = sum(f.stat().st_size for f, _ in files)
    bar: Any = None
    done = 0
    t0 = time.perf_counter()

    def count(n: int) -> None:
        nonlocal bar, done
        done += n
        if bar is None and progress and time.perf_counter() - t0 > show_after_s:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            bar = Progress(TextColumn(f"verifying {root.name}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                           transient=True)
            bar.start()
            bar.add_task("sha256", total=total)
        if bar is not None:
            bar.update(bar.task_ids[0], completed=done)

    try:
        for f, expected in files:
            try:
                actual = sha256_file(f, on_bytes=count)
            except OSError as exc:
                raise error(f"{f}: cannot read ({exc.strerror or exc}); {fix}") from None
            if actual != expected:
                raise error(f"{f}: checksum mismatch (sha256 {actual[:12]}..., {listed_in.name} says "
                            f"{expected[:12]}...): the file is corrupt or was modified; {fix}")
    finally:
        if bar is not None:
            bar.stop()


def versions() -> dict[str, str]:
    out = {}
    for dist in ("hmlm", "torch", "lightning", "tokenizers", "transformers", "safetensors", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def proc_status_bytes(path: str, field: str) -> int | None:
    """A `Field:  N kB` value of a /proc status file (MemAvailable in /proc/meminfo, VmRSS in /proc/self/status) in
    bytes; None where there is no such file (not Linux) or field."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None

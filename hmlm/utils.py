"""Small helpers shared across the package: atomic writes, checksums, versions, seeding."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator


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


def read_json_artifact(path: Path, error: type[Exception], *, missing: str, corrupt_hint: str = "") -> Any:
    """Read an artifact's JSON metadata, turning a missing or corrupt file into `error` that names the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path.parent}: {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: corrupt JSON ({exc}){corrupt_hint}") from None


def write_json(path: Path, obj: Any) -> None:
    with atomic_write_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {}
    for dist in ("hmlm", "torch", "lightning", "tokenizers", "transformers", "safetensors", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out

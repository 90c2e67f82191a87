"""DeepSpeed's host-side ops for the bank's offloaded tiers: async I/O (`async_io`, disk tier) and CPU Adam
(`cpu_adam`, host tier).

Both are C++ extensions that DeepSpeed builds with ninja the first time they are loaded (a few minutes on a loaded
machine; cached in TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions). `load_op(name)` returns the loaded module
or raises `OpUnavailable` with the reason (DeepSpeed not installed, libaio missing, the build failed); a caller with a
fallback (`memory.disk_io: auto`) logs that reason once and goes on without the op.

Both are built with DeepSpeed's *CPU* op builders whatever the accelerator: they are host code, and the CUDA flavour
of the async-I/O builder needs the CUDA toolkit's headers and libraries, which a pip-installed torch does not bring.

libaio: the async-I/O op links against libaio. Where the system has no libaio headers, point HMLM_LIBAIO_DIR at an
unpacked copy of Debian's `libaio-dev` and `libaio1` packages (`dpkg -x` of each into one folder: it then holds
usr/include/libaio.h and usr/lib/x86_64-linux-gnu/libaio.so*). The include and library folders are added to the
compiler's search paths (CPATH, LIBRARY_PATH, CFLAGS, LDFLAGS) before the build, and libaio.so.1 is loaded into the
process first, so the built op finds it without LD_LIBRARY_PATH.
"""
from __future__ import annotations

import ctypes
import glob
import logging
import os
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger("hmlm.bank")
OPS = ("async_io", "cpu_adam")
_LOCK = threading.Lock()
_LOADED: dict[str, ModuleType | BaseException] = {}


class OpUnavailable(RuntimeError):
    """A DeepSpeed op that cannot be built or loaded on this machine; the message says why."""


def _libaio_dirs(root: str) -> tuple[Path, Path]:
    base = Path(root)
    include = base / "usr" / "include"
    libs = sorted({Path(p).parent for p in glob.glob(str(base / "usr" / "lib*" / "**" / "libaio.so*"), recursive=True)})
    if not (include / "libaio.h").is_file() or not libs:
        raise OpUnavailable(f"HMLM_LIBAIO_DIR={root} holds no usr/include/libaio.h and usr/lib*/**/libaio.so* (unpack "
                            "Debian's libaio-dev and libaio1 packages there with `dpkg -x PKG.deb DIR`)")
    return include, libs[0]


def _prepend(var: str, value: str, sep: str = os.pathsep) -> None:
    old = os.environ.get(var, "")
    if value not in old.split(sep):
        os.environ[var] = value + (sep + old if old else "")


def use_libaio(root: str | None = None) -> str | None:
    """Make an unpacked libaio (HMLM_LIBAIO_DIR) visible to DeepSpeed's builder and to this process; returns the
    library folder used, or None when the system's libaio is relied on."""
    root = root or os.environ.get("HMLM_LIBAIO_DIR")
    if not root:
        return None
    include, lib = _libaio_dirs(root)
    _prepend("CPATH", str(include))
    _prepend("LIBRARY_PATH", str(lib))
    _prepend("CFLAGS", f"-I{include}", " ")   # DeepSpeed's probe for io_submit compiles with CFLAGS / links with LDFLAGS
    _prepend("LDFLAGS", f"-L{lib}", " ")
    so = sorted(lib.glob("libaio.so.1*"))
    if so:   # the op's dependency on libaio.so.1 then resolves to this already-loaded copy
        ctypes.CDLL(str(so[0]), mode=ctypes.RTLD_GLOBAL)
    return str(lib)


def _builder(name: str):
    try:
        if name == "async_io":
            from deepspeed.ops.op_builder.cpu.async_io import AsyncIOBuilder

            return AsyncIOBuilder()
        from deepspeed.ops.op_builder.cpu.cpu_adam import CPUAdamBuilder

        return CPUAdamBuilder()
    except ImportError as exc:
        raise OpUnavailable(f"DeepSpeed is not installed ({exc})") from None


def _load(name: str) -> ModuleType:
    if name == "async_io":
        use_libaio()
    builder = _builder(name)
    try:   # DeepSpeed's probe compiles and links a test program (distutils, or setuptools' copy of it)
        compatible = name != "async_io" or builder.is_compatible(verbose=False)
    except Exception as exc:
        raise OpUnavailable(f"DeepSpeed's probe for libaio failed: {type(exc).__name__}: {exc}"[:400]) from None
    if not compatible:
        raise OpUnavailable("libaio was not found (no libaio.h / libaio.so to compile and link against); install "
                            "libaio-dev or set HMLM_LIBAIO_DIR to an unpacked copy (hmlm/bank/dsops.py)")
    try:
        return builder.load(verbose=False)
    except Exception as exc:   # a compiler error, a missing ninja, ...: the first line says which
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise OpUnavailable(f"building DeepSpeed's {name} op failed: {type(exc).__name__}: "
                            f"{lines[0] if lines else ''}"[:400]) from None


def load_op(name: str) -> ModuleType:
    """DeepSpeed's `name` op (async_io | cpu_adam), built on first use; raises OpUnavailable (remembered: a failed
    build is not retried in this process)."""
    if name not in OPS:
        raise ValueError(f"unknown DeepSpeed op {name!r}; expected one of {', '.join(OPS)}")
    with _LOCK:
        got = _LOADED.get(name)
        if got is None:
            try:
                got = _load(name)
            except OpUnavailable as exc:
                got = exc
            _LOADED[name] = got
    if isinstance(got, BaseException):
        raise OpUnavailable(str(got))
    return got

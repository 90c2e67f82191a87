"""`memory.host_read: uva | pinned`: host-tier rows read straight from page-locked host RAM, without a CPU copy.

The staged read (`host_read: staged`, hmlm/bank/levels.py) copies a batch's rows on a CPU thread into a pinned buffer
and then to the device with one DMA copy; the CPU copy (one thread per row) is most of a single fetch's time. Once the
level's host tensors are page-locked, the GPU can read the rows itself:
  * uva: a gather kernel reads them through unified virtual addressing (page-locked host memory has a device
    address): one launch per tensor, the kernel's loads cross PCIe. This is how vLLM serves DeepSeek's Engram tables
    from host memory (vllm-project/vllm #56512); Triton accepts a pinned CPU tensor as a pointer (triton #1197).
  * pinned: one asynchronous copy per row (a row of a level is contiguous): the copy engines move it at DMA speed
    and no SM is used.

Costs: the level's host tensors are page-locked in place (`cudaHostRegister`) on the first UVA read, which commits
every page (the sparse, never-written moments of a level stop being free) and takes about a second per few GB; they
are unregistered when the level closes.

`gather_rows` is the one entry: a Triton kernel on CUDA, `index_select` elsewhere; `TRITON_INTERPRET=1` runs the
kernel on CPU tensors (tests/test_bank_uva.py, where Triton is installed).
"""
from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger("hmlm.bank")

HOST_READ = ("auto", "staged", "pinned", "uva")
BLOCK = 4096   # elements of a row one program copies
NUM_WARPS = 4


def check_host_read(host_read: str) -> str:
    """Refuses a value that is not a host read, naming the key."""
    if host_read not in HOST_READ:
        raise ValueError(f"memory.host_read: {host_read!r}; expected one of {', '.join(HOST_READ)}")
    return host_read


def resolve_host_read(host_read: str, compute_device: torch.device) -> str:
    """`auto` -> staged (page-locking a level in place commits all its host RAM, so it is asked for, not assumed);
    `uva` needs Triton; on the CPU there is nothing to read across, so uva and pinned are the staged path (said
    once)."""
    if check_host_read(host_read) == "auto":
        return "staged"
    if host_read == "uva" and compute_device.type == "cuda" and _triton() is None:
        raise ValueError("memory.host_read=uva needs Triton (it comes with the CUDA builds of torch); "
                         "use memory.host_read=staged")
    if host_read in ("uva", "pinned") and compute_device.type != "cuda":
        _say_once("memory.host_read=%s reads host rows from the GPU; on %s the staged read is used", host_read,
                  compute_device.type)
        return "staged"
    return host_read


@functools.lru_cache(maxsize=None)
def _say_once(msg: str, *args) -> None:
    log.info(msg, *args)


@functools.lru_cache(maxsize=1)
def _triton():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def gather_kernel(src, idx, out, width, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < width
        r = tl.load(idx + row).to(tl.int64)
        values = tl.load(src + r * width + cols, mask=keep)
        tl.store(out + row.to(tl.int64) * width + cols, values, mask=keep)

    return triton, gather_kernel


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gather_rows(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i] = src[idx[i]] for a 2-D `src` (pinned host rows under UVA, or any tensor) into `out` ([len(idx), W],
    on the compute device). The kernel runs on the current CUDA stream; elsewhere (no CUDA, no Triton) it is
    index_select."""
    if src.dim() != 2 or out.shape != (idx.numel(), src.shape[1]):
        raise ValueError(f"gather_rows: src {tuple(src.shape)}, idx {tuple(idx.shape)}, out {tuple(out.shape)}")
    kernel = _triton()
    if idx.numel() == 0:
        return out
    if kernel is None or (out.device.type != "cuda" and not interpreting()):
        return out.copy_(src.index_select(0, idx.to(src.device)))
    triton, gather_kernel = kernel
    if not src.is_contiguous() or not out.is_contiguous():
        raise ValueError("gather_rows: src and out must be contiguous")
    width = src.shape[1]
    grid = (idx.numel(), triton.cdiv(width, BLOCK))
    gather_kernel[grid](src, idx, out, width, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def copy_rows(src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i] = src[rows[i]], one asynchronous copy per row (rows: a CPU tensor); from page-locked host memory each
    is a copy-engine DMA on the current stream."""
    if src.dim() != 2 or out.shape != (rows.numel(), src.shape[1]):
        raise ValueError(f"copy_rows: src {tuple(src.shape)}, rows {tuple(rows.shape)}, out {tuple(out.shape)}")
    for i, r in enumerate(rows.tolist()):
        out[i].copy_(src[r], non_blocking=True)
    return out


class PinnedHost:
    """Page-locks (cudaHostRegister) host tensors in place for UVA reads; unregisters them on `release`."""

    def __init__(self):
        self._registered: dict[int, int] = {}   # data_ptr -> bytes

    def pin(self, *tensors: torch.Tensor | None) -> None:
        for t in tensors:
            if t is None or t.is_pinned() or t.data_ptr() in self._registered or t.numel() == 0:
                continue
            nbytes = t.numel() * t.element_size()
            err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise RuntimeError(f"memory.host_read=uva: cudaHostRegister of {nbytes / 2**30:.1f} GiB failed "
                                   f"(CUDA error {int(err)}); the host may limit locked memory (ulimit -l): use "
                                   f"memory.host_read=staged")
            self._registered[t.data_ptr()] = nbytes

    def release(self) -> None:
        for ptr in self._registered:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self._registered.clear()

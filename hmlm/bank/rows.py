"""A bank level as rows, and the record that carries a row with its optimizer state.

Every block of a level is one row of P numbers: its tensors flattened and concatenated in the memory type's spec order
(`w1 | w2 | w3` for FFN memories). One row is what a fetch gathers, what the optimizer updates and what a tier reads
or writes, so each of those is one operation per level, not one per tensor.

A *record* is a row plus its AdamW state in one byte buffer, sections aligned to 64 bytes, records padded to 4 KiB:

    [ params (P x dtype) | m (P x m_dtype) | v (P x v_dtype, or the factored row/col statistics) ] pad

Staging buffers, the disk tier's level files and the checkpoint level files all use it, so a block and its state
travel in one read and one write, at offsets aligned for direct I/O.

Checksums (`word_checksums`) are computed where the bytes are (GPU or CPU) with integer arithmetic modulo 2**32, so a
checksum computed on the GPU while writing equals the one computed on the CPU while reading.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch

from ..protocols import TensorSpec

STATE_KINDS = ("fp32", "bf16", "factored")
ALIGN = 4096          # direct-I/O alignment of records, files and buffers
SECTION = 64          # alignment of the sections inside a record
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def align(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class Piece:
    """One named tensor of a block inside a row: offset and size in elements, its factored statistics' offsets."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    f_rows: int = 0       # factored second moment: offset of the row statistics [*lead, a] in the v section
    f_cols: int = 0       # ... and of the column statistics [*lead, b]; full v of numel when the tensor is 1-D
    f_numel: int = 0

    @property
    def factored(self) -> bool:
        return len(self.shape) >= 2


class RowFormat:
    """The row and record layout of one bank level (or of the generic block)."""

    def __init__(self, spec: dict[str, TensorSpec], dtype: torch.dtype, optim_state: str = "fp32"):
        if optim_state not in STATE_KINDS:
            raise ValueError(f"optimizer state {optim_state!r}; expected one of {', '.join(STATE_KINDS)}")
        self.spec = dict(spec)
        self.dtype = dtype
        self.optim_state = optim_state
        pieces, off, foff = [], 0, 0
        for name, s in spec.items():
            n = prod(s.shape)
            if len(s.shape) >= 2:
                lead, a, b = prod(s.shape[:-2]), s.shape[-2], s.shape[-1]
                pieces.append(Piece(name, tuple(s.shape), off, n, foff, foff + lead * a, lead * (a + b)))
                foff += lead * (a + b)
            else:
                pieces.append(Piece(name, tuple(s.shape), off, n, foff, foff, n))
                foff += n
            off += n
        self.pieces = pieces
        self.numel = off
        self.m_dtype = torch.float32 if optim_state == "fp32" else torch.bfloat16
        self.v_dtype = torch.bfloat16 if optim_state == "bf16" else torch.float32
        self.v_numel = foff if optim_state == "factored" else off
        isz = lambda dt: torch.empty((), dtype=dt).element_size()  # noqa: E731
        self.param_bytes = off * isz(dtype)
        self.m_bytes = off * isz(self.m_dtype)
        self.v_bytes = self.v_numel * isz(self.v_dtype)
        self.m_offset = align(self.param_bytes, SECTION)
        self.v_offset = self.m_offset + align(self.m_bytes, SECTION)
        self.record_bytes = align(self.v_offset + self.v_bytes, SECTION)
        self.stride = align(self.record_bytes, ALIGN)
        self.param_span = align(self.param_bytes, ALIGN)   # what a params-only read of a record covers

    # ------------------------------------------------------------------ identity
    def describe(self) -> dict:
        """What identifies this layout in file headers: a file of another layout is foreign."""
        return {"pieces": [[p.name, list(p.shape)] for p in self.pieces], "dtype": DTYPE_NAMES[self.dtype],
                "optim_state": self.optim_state, "stride": self.stride, "record_bytes": self.record_bytes}

    # ------------------------------------------------------------------ rows <-> named tensors
    def named(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views [U, *shape] of the pieces of rows [U, P] (no copy)."""
        return {p.name: rows[:, p.offset:p.offset + p.numel].view(rows.shape[0], *p.shape) for p in self.pieces}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rows [U, P] from named tensors [U, *shape] (one copy)."""
        return torch.cat([tensors[p.name].reshape(tensors[p.name].shape[0], p.numel) for p in self.pieces], dim=1)

    # ------------------------------------------------------------------ records
    def params(self, rec: torch.Tensor) -> torch.Tensor:
        return rec[:, :self.param_bytes].view(self.dtype)

    def m(self, rec: torch.Tensor) -> torch.Tensor:
        return rec[:, self.m_offset:self.m_offset + self.m_bytes].view(self.m_dtype)

    def v(self, rec: torch.Tensor) -> torch.Tensor:
        return rec[:, self.v_offset:self.v_offset + self.v_bytes].view(self.v_dtype)

    def param_checksums(self, rec: torch.Tensor) -> torch.Tensor:
        """[U] int64 checksums of the values of records (or of rows of raw value bytes) [U, >= param_bytes]."""
        return word_checksums(rec[:, :self.param_bytes], 0)

    def state_checksums(self, rec: torch.Tensor) -> torch.Tensor:
        return (word_checksums(rec[:, self.m_offset:self.m_offset + self.m_bytes], self.m_offset // 2)
                + word_checksums(rec[:, self.v_offset:self.v_offset + self.v_bytes], self.v_offset // 2))

    def checksums(self, rec: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """[U, 2] int64: checksum of each record's values and of its optimizer state (0 where `state` [U] bool, a
        CPU tensor, is False: a never-written state is all zeros, whose checksum is 0)."""
        out = torch.zeros((rec.shape[0], 2), dtype=torch.int64, device=rec.device)
        out[:, 0] = self.param_checksums(rec)
        if state is None or bool(state.any()):
            st = self.state_checksums(rec)
            out[:, 1] = st if state is None else torch.where(state.to(st.device), st, torch.zeros_like(st))
        return out


def checksums_via(device: torch.device | None, fmt: RowFormat, rec: torch.Tensor, state: torch.Tensor | None = None,
                  *, params_only: bool = False) -> torch.Tensor:
    """Checksums of records (CPU result), computed on `device` when it is an accelerator: copying a chunk over PCIe
    and summing it there is many times faster than summing it on the CPU (bulk initialisation, export, checkpoints)."""
    if device is not None and device.type == "cuda" and rec.device.type == "cpu":
        rec = rec.to(device, non_blocking=rec.is_pinned())
    out = fmt.param_checksums(rec) if params_only else fmt.checksums(rec, state)
    return out.cpu()


_WEIGHTS: dict[tuple[int, int, str], torch.Tensor] = {}
_K = -1640531535  # 0x9E3779B1 (the golden-ratio multiplier) as a signed 32-bit integer


def _weights(base: int, n: int, device: torch.device) -> torch.Tensor:
    key = (base, n, str(device))
    w = _WEIGHTS.get(key)
    if w is None:
        idx = torch.arange(base + 1, base + n + 1, dtype=torch.int64, device=device)
        w = ((idx * _K) | 1).to(torch.int32)   # odd: a change of any one 16-bit word always changes the sum
        if len(_WEIGHTS) > 256:
            _WEIGHTS.clear()
        _WEIGHTS[key] = w
    return w


CHUNK_WORDS = 1 << 16


def word_checksums(buf: torch.Tensor, base: int = 0) -> torch.Tensor:
    """[U] int64 checksums of byte rows [U, n] (n even): sum_j w_(base+j) * word_j mod 2**32 over 16-bit words.

    Integer sums are exact modulo 2**32 in any order and at any accumulator width, so the GPU (torch), the CPU (numpy,
    which does this ~4x faster than torch on a CPU) and any chunking agree bit for bit. It detects torn writes,
    truncation, foreign files and bit flips (any single changed word changes it; other corruptions escape with
    probability ~2**-32); it is not a cryptographic hash.
    """
    rows, n = buf.shape
    if n % 2:
        raise ValueError(f"checksums need an even number of bytes per row, got {n}")
    try:
        words = buf.view(torch.int16)  # a section of records: strided rows, no copy
    except RuntimeError:
        words = buf.contiguous().view(torch.int16)
    nw = words.shape[1]
    if buf.device.type == "cpu":
        import numpy as np

        arr = words.numpy()
        total = np.zeros(rows, dtype=np.int32)
        for a in range(0, nw, CHUNK_WORDS):
            b = min(nw, a + CHUNK_WORDS)
            total += arr[:, a:b].astype(np.int32) @ _weights(base + a, b - a, buf.device).numpy()
        return torch.from_numpy(total.astype(np.int64))
    total = torch.zeros(rows, dtype=torch.int32, device=buf.device)
    step = max(1024, (1 << 22) // max(1, rows))  # bounded temporaries on a full GPU
    for a in range(0, nw, step):
        b = min(nw, a + step)
        prod = words[:, a:b].to(torch.int32).mul_(_weights(base + a, b - a, buf.device))
        total += prod.sum(1, dtype=torch.int32)
    return total.to(torch.int64)

"""The in-place AdamW of device-tier rows (hmlm/bank/indexed_adamw.py): the same update as the default updater on
gathered rows, rows not listed untouched, clear errors; its Triton kernel against the torch reference where it runs
(Triton's interpreter on the CPU, the kernel on CUDA)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from hmlm.bank import indexed_adamw
from hmlm.bank.optim import AdamHyper, UpdateGroup, fused_adamw
from hmlm.bank.rows import RowFormat
from hmlm.memories.ffn import FFNMemory
from hmlm.protocols import AnchorShape

SHAPE = AnchorShape(n_layers=2, d_model=16, n_heads=1, head_dim=16, ffn_dim=32)
HYPER = AdamHyper(1e-2, 0.9, 0.95, 1e-8, 0.1)


def level(state: str, n: int = 9, seed: int = 0, device: str = "cpu"):
    """A level's values and moments [n, P] in the dtypes `state` keeps, plus 4 fetched rows' gradient and steps."""
    fmt = RowFormat(FFNMemory().block_spec(SHAPE, 3, 2), torch.bfloat16, state)
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, fmt.numel, generator=g).to(fmt.dtype)
    m = (torch.randn(n, fmt.numel, generator=g) * 0.1).to(fmt.m_dtype)
    v = (torch.rand(n, fmt.numel, generator=g) * 0.01).to(fmt.v_dtype)
    rows = torch.tensor([7, 0, 3, 8])
    grad = torch.randn(len(rows), fmt.numel, generator=g).to(torch.bfloat16)
    steps = torch.tensor([1, 2, 50, 1000])
    return fmt, *(t.to(device) for t in (p, m, v, rows, grad, steps))


@pytest.mark.parametrize("state", ["fp32", "bf16"])
def test_equals_the_default_updater_on_gathered_rows(state):
    """Bit for bit what fused_adamw does to the same rows gathered out (the store's general path), with weight decay
    and a clip scale; the other rows keep their values and moments."""
    fmt, p, m, v, rows, grad, steps = level(state)
    scale = torch.tensor(0.5)
    group = UpdateGroup(fmt, p[rows].clone(), grad.clone(), m[rows].clone(), v[rows].clone(), steps)
    fused_adamw([group], HYPER, scale)
    p0, m0, v0 = p.clone(), m.clone(), v.clone()
    indexed_adamw.indexed_adamw_(p, m, v, rows, grad, steps, HYPER, scale)
    assert torch.equal(p[rows], group.params) and torch.equal(m[rows], group.m) and torch.equal(v[rows], group.v)
    others = torch.tensor([i for i in range(len(p)) if i not in rows.tolist()])
    for now, before in ((p, p0), (m, m0), (v, v0)):
        assert torch.equal(now[others], before[others])
    assert not torch.equal(p[rows], p0[rows])


def test_no_rows_is_a_no_op_and_shapes_are_checked():
    fmt, p, m, v, rows, grad, steps = level("bf16")
    p0 = p.clone()
    indexed_adamw.indexed_adamw_(p, m, v, rows[:0], grad[:0], steps[:0], HYPER)
    assert torch.equal(p, p0)
    with pytest.raises(ValueError, match="factored moments take optim.fused_adamw"):
        indexed_adamw.indexed_adamw_(p, m, v[:, :3], rows, grad, steps, HYPER)
    with pytest.raises(ValueError, match=r"grad \(3, .*for 4 rows"):
        indexed_adamw.indexed_adamw_(p, m, v, rows, grad[:3], steps, HYPER)


def _kernel_against_reference(device: str) -> None:
    for state in ("fp32", "bf16"):
        fmt, p, m, v, rows, grad, steps = level(state, n=11, seed=2, device=device)
        scale = torch.tensor(0.7, device=device)
        ref = [t.clone() for t in (p, m, v)]
        indexed_adamw.indexed_adamw_(*ref, rows, grad, steps, HYPER, scale, use_kernel=False)
        indexed_adamw.indexed_adamw_(p, m, v, rows, grad, steps, HYPER, scale)
        # the kernel rounds a few float32 operations differently (FMA contraction): within a bf16 ulp of the values
        torch.testing.assert_close(p.float(), ref[0].float(), rtol=8e-3, atol=1e-6)
        torch.testing.assert_close(m.float(), ref[1].float(), rtol=8e-3, atol=1e-7)
        torch.testing.assert_close(v.float(), ref[2].float(), rtol=8e-3, atol=1e-8)
        untouched = [i for i in range(len(p)) if i not in rows.tolist()]
        assert torch.equal(p[untouched], ref[0][untouched])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (CUDA builds only)")
def test_the_triton_kernel_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    indexed_adamw._kernel.cache_clear()
    try:
        _kernel_against_reference("cpu")
    finally:
        indexed_adamw._kernel.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs CUDA and Triton")
def test_the_triton_kernel_on_cuda():
    assert indexed_adamw.available(torch.device("cuda"))
    _kernel_against_reference("cuda")


@pytest.mark.parametrize("chunk_elements", [1, 300, 1 << 20])
def test_cpu_chunks_change_nothing(monkeypatch, chunk_elements):
    """The CPU updates rows a few at a time (optim.CPU_CHUNK_ELEMENTS, for the cache); the in-place path and the
    default updater's both give bit for bit the unchunked update of all rows at once, for 40 rows of steps 1..200
    (enough rows that pow's vectorised body and scalar tail both occur, which is why the bias corrections are
    computed for all rows at once)."""
    from hmlm.bank import optim

    fmt, p, m, v, _, _, _ = level("fp32", n=50, seed=3)
    g = torch.Generator().manual_seed(4)
    rows = torch.randperm(50, generator=g)[:40]
    grad = torch.randn(40, fmt.numel, generator=g)
    steps = torch.randint(1, 200, (40,), generator=g)
    lr, scale = torch.tensor(HYPER.lr), torch.tensor(0.5)
    want = [t[rows].clone() for t in (p, m, v)]
    optim._row_adamw_(*want[:1], grad, *want[1:], steps, lr, scale, HYPER.beta1, HYPER.beta2, HYPER.eps,
                      HYPER.weight_decay)
    monkeypatch.setattr(optim, "CPU_CHUNK_ELEMENTS", chunk_elements)
    group = UpdateGroup(fmt, p[rows].clone(), grad.clone(), m[rows].clone(), v[rows].clone(), steps)
    fused_adamw([group], HYPER, scale)
    indexed_adamw.indexed_adamw_(p, m, v, rows, grad, steps, HYPER, scale)
    for got in ((group.params, group.m, group.v), (p[rows], m[rows], v[rows])):
        for a, b in zip(got, want):
            assert torch.equal(a, b)

"""`memory.host_read: uva | pinned` (hmlm/bank/uva.py): host-tier rows read from page-locked host RAM by a GPU kernel
or one DMA per row.

On the CPU: the key's resolution and refusals, the gather against index_select (the Triton kernel itself through
Triton's interpreter where Triton is installed), and a host-tier store that trains identically whichever read is
asked for. On CUDA (the GPU machine runs this file too): both reads train bit for bit like the staged read.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from hmlm.bank.layout import BankLayout
from hmlm.bank.stores import TieredStore
from hmlm.bank.uva import copy_rows, gather_rows, resolve_host_read
from hmlm.config import RecipeError
from hmlm.memories.ffn import FFNMemory
from hmlm.protocols import AnchorShape

K = 3
SHAPE = AnchorShape(n_layers=2, d_model=8, n_heads=1, head_dim=8, ffn_dim=16)


def test_resolution_and_refusals(caplog):
    cpu = torch.device("cpu")
    assert resolve_host_read("auto", cpu) == "staged"
    assert resolve_host_read("staged", cpu) == "staged"
    with caplog.at_level("INFO", logger="hmlm.bank"):
        assert resolve_host_read("uva", cpu) == "staged"   # nothing to read across on the CPU
        assert resolve_host_read("pinned", cpu) == "staged"
    with pytest.raises(ValueError, match="memory.host_read: 'mapped'"):
        resolve_host_read("mapped", cpu)


def test_recipe_key_is_checked(tiny_recipe):
    assert tiny_recipe(**{"memory.host_read": "uva"}).memory.host_read == "uva"
    assert tiny_recipe(**{"memory.host_read": "pinned"}).memory.host_read == "pinned"
    with pytest.raises(RecipeError, match="memory.host_read"):
        tiny_recipe(**{"memory.host_read": "mapped"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_rows_equals_index_select(dtype):
    g = torch.Generator().manual_seed(0)
    src = torch.randn((11, 9000), generator=g).to(dtype)   # wider than one program's block
    idx = torch.tensor([3, 0, 10, 3, 7])
    out = torch.empty((5, 9000), dtype=dtype)
    assert torch.equal(gather_rows(src, idx, out), src[idx])
    assert torch.equal(gather_rows(src, idx[:0], out[:0]), out[:0])
    with pytest.raises(ValueError, match="gather_rows"):
        gather_rows(src, idx, out[:4])
    assert torch.equal(copy_rows(src, idx, torch.empty_like(out)), src[idx])
    with pytest.raises(ValueError, match="copy_rows"):
        copy_rows(src, idx, out[:4])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (CUDA builds only)")
def test_the_triton_kernel_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from hmlm.bank import uva

    uva._triton.cache_clear()
    try:
        g = torch.Generator().manual_seed(1)
        src = torch.randn((6, 5000), generator=g)
        idx = torch.tensor([5, 1, 1])
        out = torch.empty((3, 5000))
        assert torch.equal(uva.gather_rows(src, idx, out), src[idx])
    finally:
        uva._triton.cache_clear()


def _train(store: TieredStore, steps: int, device: torch.device) -> list[float]:
    """Fits the fetched memory to random targets for a few steps (prefetch announced one step ahead)."""
    g = torch.Generator().manual_seed(3)
    layout = store.layout
    targets = {n: (torch.randn((K ** 3, *s.shape), generator=g) * 0.05).to(device)
               for n, s in layout.spec(layout.total_rank).items()}
    leaves = [torch.randint(0, K ** 3, (5,), generator=g) for _ in range(steps + 1)]
    losses = []
    for t in range(steps):
        store.prefetch(torch.stack([leaves[t + 1] // K ** 2, leaves[t + 1] // K, leaves[t + 1]], 1))
        leaf = leaves[t]
        fetched = store.fetch(torch.stack([leaf // K ** 2, leaf // K, leaf], 1), grad=True)
        loss = sum(((fetched[n] - targets[n][leaf.to(device)]) ** 2).mean() for n in fetched)
        loss.backward()
        losses.append(float(loss.detach()))
        store.step(lr=3e-3, weight_decay=0.01, grad_clip=0.5)
    return losses


def _run(host_read: str, device: torch.device, optim_state: str = "fp32"):
    layout = BankLayout(FFNMemory(), SHAPE, (3, 2, 1), K, (0, 1))
    store = TieredStore(layout, seed=4, generic=False, tiers=["device", "host", "host"], host_read=host_read,
                        optim_state=optim_state, dtype=torch.bfloat16 if optim_state == "bf16" else torch.float32)
    store.to_compute(device)
    losses = _train(store, 6, device)
    rows = {k: store.read_rows(k, with_state=True) for k in store.keys()}
    used = store.ops_used()["host_read"]
    store.close()
    return losses, {k: (b.params.cpu(), b.m.cpu(), b.v.cpu()) for k, b in rows.items()}, used


@pytest.mark.parametrize("read", ["uva", "pinned"])
def test_host_tier_trains_identically_whichever_read_is_asked_for_on_cpu(read):
    ref = _run("staged", torch.device("cpu"))
    got = _run(read, torch.device("cpu"))
    assert got[2] == "staged"
    assert got[0] == ref[0]
    for key in ref[1]:
        for a, b in zip(ref[1][key], got[1][key]):
            assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU machine runs it)")
@pytest.mark.parametrize("optim_state", ["fp32", "bf16"])
@pytest.mark.parametrize("read", ["uva", "pinned"])
def test_locked_reads_train_bit_for_bit_like_the_staged_read_on_cuda(read, optim_state):
    ref = _run("staged", torch.device("cuda"), optim_state)
    got = _run(read, torch.device("cuda"), optim_state)
    assert got[2] == read and ref[2] == "staged"
    assert got[0] == ref[0]
    for key in ref[1]:
        for a, b in zip(ref[1][key], got[1][key]):
            assert torch.equal(a, b)

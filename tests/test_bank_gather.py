"""GatherLayout: the fetch's per-sample gather into layer-major tensors equals plain indexing, and its backward sums
the samples' gradients of a shared row in float32, rounded once to the table's dtype."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hmlm.bank.gather import gather_layout, on_device, plan_level
from hmlm.bank.rows import RowFormat
from hmlm.protocols import TensorSpec

L, D = 3, 4


def _spec(r: int) -> dict[str, TensorSpec]:
    return {"w1": TensorSpec((L, D, r), rank_axis=2), "w3": TensorSpec((L, r, D), rank_axis=1)}


def _reference(ranks, tables, indices):
    """What fetch computed before GatherLayout: index_select, the pieces' views, a cat over levels (autograd)."""
    per_level = []
    for r, table, index in zip(ranks, tables, indices):
        rows = table.index_select(0, index)
        per_level.append(RowFormat(_spec(r), table.dtype).named(rows))
    return {name: torch.cat([pl[name] for pl in per_level], dim=1 + s.rank_axis)
            for name, s in _spec(sum(ranks)).items()}


def _case(seed: int, batch: int, ranks: tuple[int, ...], dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    tables, indices, plans, offset = [], [], [], 0
    for r in ranks:
        fmt = RowFormat(_spec(r), dtype)
        rows_u = int(torch.randint(1, batch + 1, (1,), generator=g))
        # every table row is some sample's (as in a fetch): a permutation of the rows, then random repeats
        index = torch.cat([torch.randperm(rows_u, generator=g), torch.randint(0, rows_u, (batch - rows_u,), generator=g)])
        index = index[torch.randperm(batch, generator=g)]
        tables.append(torch.randn(rows_u, fmt.numel, generator=g).to(dtype).requires_grad_(True))
        indices.append(index)
        plans.append(plan_level(fmt, index, offset, r))
        offset += r
    return tables, indices, on_device(plans, torch.device("cpu"))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 6), ranks=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       bf16=st.booleans())
def test_gather_layout_matches_indexing_forward_and_backward(seed, batch, ranks, bf16):
    dtype = torch.bfloat16 if bf16 else torch.float32
    tables, indices, plans = _case(seed, batch, tuple(ranks), dtype)
    spec = _spec(sum(ranks))
    got = gather_layout(spec, plans, batch, tables)
    ref_tables = [t.detach().clone().requires_grad_(True) for t in tables]
    want = _reference(ranks, ref_tables, indices)
    gen = torch.Generator().manual_seed(seed + 1)
    upstream = {name: torch.randn(want[name].shape, generator=gen).to(dtype) for name in spec}
    for name in spec:
        assert got[name].shape == want[name].shape and got[name].dtype == dtype
        assert torch.equal(got[name], want[name])
        # layer-major: each layer's [B, ...] slice is contiguous
        assert got[name].movedim(0, 1).is_contiguous()
    sum((got[n].float() * upstream[n].float()).sum() for n in spec).backward()
    # expected: each row's gradient summed over its samples in float32, then rounded once to the table's dtype
    for lvl, (table, index) in enumerate(zip(tables, indices)):
        fmt = RowFormat(_spec(ranks[lvl]), dtype)
        offset = sum(ranks[:lvl])
        per_sample = torch.cat([upstream[p.name].narrow(1 + _spec(1)[p.name].rank_axis, offset, ranks[lvl])
                                .float().reshape(batch, -1) for p in fmt.pieces], dim=1)
        expect = torch.zeros(table.shape[0], fmt.numel).index_add_(0, index, per_sample).to(dtype)
        torch.testing.assert_close(table.grad, expect, rtol=0, atol=0 if not bf16 else 1e-2)


def test_gather_layout_is_deterministic_with_shared_rows():
    tables, _, plans = _case(0, 8, (2, 1), torch.bfloat16)
    spec = _spec(3)
    grads = []
    for _ in range(2):
        ts = [t.detach().clone().requires_grad_(True) for t in tables]
        out = gather_layout(spec, plans, 8, ts)
        sum(o.float().pow(2).sum() for o in out.values()).backward()
        grads.append([t.grad for t in ts])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_gather_layout_without_gradient_for_a_piece():
    tables, _, plans = _case(3, 4, (2,), torch.float32)
    out = gather_layout(_spec(2), plans, 4, tables)
    out["w1"].sum().backward()   # w3 gets no gradient: its part of the rows' gradient is zero
    fmt = RowFormat(_spec(2), torch.float32)
    w3 = fmt.named(tables[0].grad)["w3"]
    assert torch.count_nonzero(w3) == 0 and torch.count_nonzero(fmt.named(tables[0].grad)["w1"]) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fetched_bank_gradient_has_the_compute_dtype(dtype):
    """A bank in `dtype` fetched in `dtype`: the leaf is the fetched rows themselves (no float32 copy), its gradient
    in that dtype, and the step updates the values in their storage dtype."""
    from hmlm.bank.layout import BankLayout
    from hmlm.bank.stores import DeviceStore
    from hmlm.memories.ffn import FFNMemory
    from hmlm.protocols import AnchorShape

    shape = AnchorShape(n_layers=2, d_model=8, n_heads=2, head_dim=4, ffn_dim=16)
    layout = BankLayout(FFNMemory(), shape, sizes=(4, 2), branching=2, layers=(0, 1))
    store = DeviceStore(layout, dtype=dtype, generic=False, seed=0)
    paths = torch.tensor([[0, 1], [0, 3], [1, 2]])
    mem = store.fetch(paths, grad=True, dtype=dtype)
    assert all(t.dtype == dtype for t in mem.values())
    sum(t.float().pow(2).sum() for t in mem.values()).backward()
    for key, rows, grad in store.fetched_grads():
        assert grad.dtype == torch.float32   # the documented contract of fetched_grads
    assert all(f.leaf.grad.dtype == dtype for f in store._fetched)
    before = store.read_rows("l0", torch.tensor([0, 1])).params.clone()
    store.step(lr=1e-2, weight_decay=0.0)
    after = store.read_rows("l0", torch.tensor([0, 1])).params
    assert after.dtype == dtype and not torch.equal(before, after)


def test_to_device_many_returns_each_tensor_on_the_device():
    from hmlm.bank.levels import to_device_many

    parts = [torch.tensor([3, 1]), torch.zeros(0, dtype=torch.long), torch.tensor([7])]
    moved = to_device_many(parts, torch.device("cpu"))
    assert [m.tolist() for m in moved] == [[3, 1], [], [7]]
    assert to_device_many([], torch.device("cpu")) == []

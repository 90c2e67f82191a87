"""The host/disk pipeline never serves a stale block: with any sequence of announcements (right, wrong, early,
missing) interleaved with training steps and inference fetches, a tiered store fetches and updates exactly what a
store without prefetch does, bit for bit."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hmlm.bank.layout import BankLayout
from hmlm.bank.stores import DeviceStore, TieredStore
from hmlm.memories.ffn import FFNMemory
from hmlm.protocols import AnchorShape

K, LEVELS = 3, 3
SHAPE = AnchorShape(n_layers=1, d_model=8, n_heads=1, head_dim=8, ffn_dim=16)


def layout() -> BankLayout:
    return BankLayout(FFNMemory(), SHAPE, (2, 1, 1), K, (0,))


def paths_strategy(batch: int):
    return st.lists(st.tuples(*(st.integers(0, K ** (lvl + 1) - 1) for lvl in range(LEVELS))),
                    min_size=batch, max_size=batch).map(lambda rows: torch.tensor(rows, dtype=torch.long))


def fake_loss(fetched: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=g)).sum() for t in fetched.values())


ACTIONS = st.sampled_from(["announce_next", "announce_next2", "announce_random", "none", "infer"])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(paths_strategy(4), min_size=2, max_size=6), actions=st.lists(ACTIONS, min_size=6, max_size=6),
       noise=paths_strategy(4), tiers=st.sampled_from([["host"] * 3, ["disk"] * 3, ["host", "disk", "device"]]),
       optim_state=st.sampled_from(["fp32", "bf16", "factored"]))
def test_prefetch_never_serves_a_stale_block(tmp_path_factory, batches, actions, noise, tiers, optim_state):
    lay = layout()
    ref = DeviceStore(lay, seed=3, optim_state=optim_state)
    sut = TieredStore(lay, seed=3, tiers=tiers, optim_state=optim_state, disk_dir=tmp_path_factory.mktemp("bank"))
    try:
        sut.prefetch(batches[0])
        for i, paths in enumerate(batches):
            action = actions[i % len(actions)]
            if action == "announce_next" and i + 1 < len(batches):
                sut.prefetch(batches[i + 1])
            elif action == "announce_next2" and i + 2 < len(batches):
                sut.prefetch(batches[i + 2])
            elif action == "announce_random":
                sut.prefetch(noise)
            elif action == "infer":
                a, b = ref.fetch(noise), sut.fetch(noise)
                for name in a:
                    assert torch.equal(a[name], b[name]), f"inference fetch of {name} differs"
            fa, fb = ref.fetch(paths, grad=True), sut.fetch(paths, grad=True)
            for name in fa:
                assert torch.equal(fa[name], fb[name]), f"step {i}: fetched {name} differs ({tiers})"
            fake_loss(fa, i).backward()
            fake_loss(fb, i).backward()
            ref.step(lr=0.05, weight_decay=0.1, grad_clip=1.0)
            sut.step(lr=0.05, weight_decay=0.1, grad_clip=1.0)
        a, b = ref.state_dict(), sut.state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), f"final {key} differs"
    finally:
        sut.close()


def test_pipeline_serves_staged_and_recent_rows(tmp_path):
    """With the loader's order (announce step n+1 before step n runs), training fetches need no synchronous read."""
    lay = layout()
    store = TieredStore(lay, seed=0, tiers=["host", "host", "disk"], disk_dir=tmp_path)
    g = torch.Generator().manual_seed(0)
    batches = [torch.stack([torch.randint(0, K ** (lvl + 1), (4,), generator=g) for lvl in range(LEVELS)], 1)
               for _ in range(6)]
    store.prefetch(batches[0])
    for i, paths in enumerate(batches):
        if i + 1 < len(batches):
            store.prefetch(batches[i + 1])
        fake_loss(store.fetch(paths, grad=True), i).backward()
        store.step(lr=0.01, weight_decay=0.0)
    for key in ("l0", "l1", "l2"):
        stats = store.levels[key].stats
        assert stats["sync"] == 0, (key, stats)
        assert stats["staged"] > 0
    store.close()

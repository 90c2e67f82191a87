"""Conformance checks for bank stores (hmlm.protocols.Store)."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from ..protocols import Store
from .memories import BRANCHING, SIZES, random_batch, randomize_bank

HYPER = {"lr": 1e-2, "weight_decay": 0.1}


def make_layout(sizes: tuple[int, ...] = SIZES):
    from ..bank.layout import BankLayout
    from ..memories.ffn import FFNMemory
    from .common import tiny_anchor

    return BankLayout(FFNMemory(), tiny_anchor().shape, tuple(sizes), BRANCHING, (0, 1))


class _Model:
    """Just what random_batch/randomize_bank read from a MemoryLM."""

    def __init__(self, store: Store, layout):
        self.store, self.layout = store, layout
        self.anchor = type("A", (), {"config": type("C", (), {"vocab_size": 8})()})()


def _values(store: Store) -> dict[str, torch.Tensor]:
    return {key: store.read_rows(key).params.clone() for key in store.keys()}


def _train_step(store: Store, paths: torch.Tensor, seed: int) -> None:
    tensors = store.fetch(paths, grad=True)
    g = torch.Generator().manual_seed(seed)
    loss = sum((t.float() * torch.randn(t.shape, generator=g)).sum() for t in tensors.values())
    loss.backward()
    store.step(**HYPER)


def check_fetch(store: Store, layout) -> None:
    model = _Model(store, layout)
    randomize_bank(model)
    _, paths = random_batch(model)
    spec = layout.spec(layout.total_rank)
    out = store.fetch(paths)
    assert out.keys() == spec.keys(), f"fetch returned tensors {sorted(out)}, the layout has {sorted(spec)}"
    for name, s in spec.items():
        assert tuple(out[name].shape) == (len(paths), *s.shape), \
            f"fetch[{name!r}] has shape {tuple(out[name].shape)}, expected [B, *spec] = {(len(paths), *s.shape)}"
    # sample 0's tensors are its path's blocks concatenated along the rank axis
    for name, s in spec.items():
        parts = [store.format_of(f"l{lvl}").named(store.read_rows(f"l{lvl}", [int(paths[0, lvl])]).params)[name][0]
                 for lvl in layout.active_levels]
        torch.testing.assert_close(out[name][0].float(), torch.cat(parts, dim=s.rank_axis).float(), rtol=0, atol=0,
                                   msg=lambda m: f"fetch[{name!r}][0] is not the concatenation of its path's blocks")
    # under autocast the model asks for its compute dtype: the same values, rounded once
    low = store.fetch(paths, dtype=torch.bfloat16)
    for name in spec:
        assert low[name].dtype == torch.bfloat16, f"fetch(dtype=bfloat16)[{name!r}] came as {low[name].dtype}"
        torch.testing.assert_close(low[name], out[name].to(torch.bfloat16), rtol=0, atol=0)
    if store.has_generic:
        mask = torch.tensor([True] + [False] * (len(paths) - 1))
        out2 = store.fetch(paths, generic_mask=mask)
        gen = store.format_of("generic").named(store.read_rows("generic", [0]).params)
        for name in spec:
            torch.testing.assert_close(out2[name][0].float(), gen[name][0].float(), rtol=0, atol=0)
            torch.testing.assert_close(out2[name][1:], out[name][1:], rtol=0, atol=0)


def check_update_round_trip(store: Store, layout) -> None:
    """A step changes exactly the fetched rows; fetched_grads lists exactly them; untouched rows are bit-identical."""
    model = _Model(store, layout)
    _, paths = random_batch(model, b=3, seed=5)
    before = _values(store)
    tensors = store.fetch(paths, grad=True)
    sum(t.float().sum() * (i + 1) for i, t in enumerate(tensors.values())).backward()
    groups = store.fetched_grads()
    for key, rows, grad in groups:
        if key == "generic":
            continue
        want = sorted(set(paths[:, int(key[1:])].tolist()))
        assert sorted(rows.tolist()) == want, f"fetched_grads({key}) rows {sorted(rows.tolist())}, fetched {want}"
        assert grad.shape == (len(want), store.format_of(key).numel), f"{key}: gradient shape {tuple(grad.shape)}"
    assert {k for k, _, _ in groups} >= {f"l{lvl}" for lvl in layout.active_levels}
    store.step(**HYPER)
    after = _values(store)
    for lvl in layout.active_levels:
        key = f"l{lvl}"
        touched = set(paths[:, lvl].tolist())
        for node in range(store.nodes(key)):
            same = torch.equal(before[key][node], after[key][node])
            assert same == (node not in touched), \
                f"row {key}[{node}] {'changed without being fetched' if not same else 'was fetched but not updated'}"
    # write_rows / read_rows
    key = store.keys()[0]
    new = torch.full((2, store.format_of(key).numel), 0.25)
    store.write_rows(key, [0, 2], new)
    torch.testing.assert_close(store.read_rows(key, [0, 2]).params.float(), new, rtol=0, atol=0)
    torch.testing.assert_close(store.read_rows(key, [1]).params, after[key][1:2], rtol=0, atol=0)
    # discard_fetched: no update
    store.fetch(paths, grad=True)["w1"].sum().backward()
    store.discard_fetched()
    snapshot = _values(store)
    store.step(**HYPER)
    for k, v in _values(store).items():
        assert torch.equal(v, snapshot[k]), f"{k}: a step after discard_fetched() changed the bank"


def check_persistence(make: Any, layout) -> None:
    """state_dict, save/load and save_checkpoint/load_checkpoint restore values exactly; after a checkpoint restore
    (a new store, as after a crash, on the same files) the next update is bit-identical (the optimizer state too)."""
    a = make(layout, seed=0)
    model = _Model(a, layout)
    _, paths = random_batch(model, b=3, seed=7)
    _train_step(a, paths, 0)
    b = make(layout, seed=1)
    b.load_state_dict(a.state_dict())
    for k, v in _values(a).items():
        assert torch.equal(v, _values(b)[k]), f"{k}: load_state_dict(state_dict()) changed values"
    with tempfile.TemporaryDirectory() as tmp:
        a.save(Path(tmp) / "bank")
        c = make(layout, seed=2, init=False)
        c.load(Path(tmp) / "bank")
        for k, v in _values(a).items():
            assert torch.equal(v, _values(c)[k]), f"{k}: save/load changed values"
        manifest = a.save_checkpoint(Path(tmp) / "ckpt", 1)
        at_checkpoint = _values(a)
        _train_step(a, paths, 1)
        after = _values(a)
        a.close()
        d = make(layout, seed=3, init=False, like=a)
        d.load_checkpoint(Path(tmp) / "ckpt", manifest)
        for k, v in _values(d).items():
            assert torch.equal(v, at_checkpoint[k]), f"{k}: load_checkpoint did not restore the checkpoint's values"
        _train_step(d, paths, 1)
        for k, v in _values(d).items():
            assert torch.equal(v, after[k]), f"{k}: the update after a checkpoint restore differs (state lost)"
        for s in (b, c, d):
            s.close()


def check_store(make: Any) -> None:
    """`make(layout, seed=, init=True, like=None)` returns a store placed on the CPU (with `like`: a new store on the
    files of that closed one, as a resumed run would open it). Runs every store check."""
    layout = make_layout()
    s = make(layout, seed=0)
    assert isinstance(s, Store), "the store lacks methods of hmlm.protocols.Store"
    check_fetch(s, layout)
    check_update_round_trip(make(layout, seed=0), layout)
    check_persistence(make, layout)


class StoreTests:
    """pytest mix-in: subclass as `class TestMine(StoreTests)` and set `plugin` (and `options`, `memory`)."""

    plugin: Any = None                        # registry name of the store, or its class
    options: Mapping[str, Any] | None = None  # as under `memory.store_options` in a recipe
    memory: Mapping[str, Any] = {}            # other memory.* keys (e.g. {"optim_state": "bf16"})

    def make(self, layout, *, seed: int = 0, init: bool = True, like: Store | None = None) -> Store:
        from ..config import MemoryConfig
        from .common import make_plugin, plugin_class

        assert self.plugin is not None, "set `plugin` to the store's registry name or class"
        tmp = getattr(like, "disk_dir", None)   # a resumed store reopens the disk-tier files of the one it replaces
        if tmp is None:
            tmp = tempfile.mkdtemp(prefix="hmlm-store-kit-")
            atexit.register(shutil.rmtree, tmp, True)
        cfg = MemoryConfig(**{"disk_dir": str(tmp), "io_threads": 2, **dict(self.memory)})
        if hasattr(plugin_class("stores", self.plugin), "from_recipe"):
            tiers = [cfg.tiers if isinstance(cfg.tiers, str) and cfg.tiers != "auto" else "device"] * len(layout.sizes)
            store = make_plugin("stores", self.plugin, "from_recipe", layout, cfg, seed=seed, init=init, tiers=tiers,
                                options=self.options)
        else:
            store = make_plugin("stores", self.plugin, None, layout, generic=cfg.generic, dtype=torch.float32,
                                seed=seed, init=init, options=self.options)
        return store.to_compute("cpu")

    def test_protocol(self):
        assert isinstance(self.make(make_layout()), Store)

    def test_fetch(self):
        layout = make_layout()
        check_fetch(self.make(layout), layout)

    def test_update_round_trip(self):
        layout = make_layout()
        check_update_round_trip(self.make(layout), layout)

    def test_persistence_round_trips(self):
        check_persistence(self.make, make_layout())

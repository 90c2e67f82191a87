"""Conformance checks for memory types (hmlm.protocols.MemoryType)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..protocols import MEMORY_SITES, MemoryType
from .common import make_plugin, tiny_anchor

SIZES = (4, 2, 2)   # r per level of the kit's bank
BRANCHING = 3
BATCH = 4


def tiny_memory_model(memory: MemoryType, *, sizes: tuple[int, ...] = SIZES, branching: int = BRANCHING,
                      seed: int = 0, layers: tuple[int, ...] = (0, 1)):
    """A MemoryLM of the tiny anchor with a device-tier bank of `memory`, built the way `hmlm fit` builds one."""
    from ..bank.layout import BankLayout
    from ..bank.stores import DeviceStore
    from ..model import MemoryLM

    anchor = tiny_anchor(seed=seed)
    layout = BankLayout(memory, anchor.shape, tuple(sizes), branching, layers)
    return MemoryLM(anchor, layout, DeviceStore(layout, seed=seed))


def random_batch(model, b: int = BATCH, t: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [b, t] and valid tree paths [b, levels] (child ids p*k + j) for the model's bank."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.anchor.config.vocab_size
    k, levels = model.layout.branching, len(model.layout.sizes)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    cols = [torch.randint(0, k, (b,), generator=g)]
    for _ in range(1, levels):
        cols.append(cols[-1] * k + torch.randint(0, k, (b,), generator=g))
    return ids, torch.stack(cols, 1)


def randomize_bank(model, seed: int = 1, std: float = 0.05) -> None:
    """Give every block non-zero values (a zero-initialised memory would make the isolation checks vacuous)."""
    g = torch.Generator().manual_seed(seed)
    for key in model.store.keys():
        rows = torch.arange(model.store.nodes(key))
        values = model.store.read_rows(key, rows).params
        model.store.write_rows(key, rows, torch.randn(values.shape, generator=g) * std)


def check_block_spec(memory: MemoryType, shape=None) -> None:
    shape = shape or tiny_anchor().shape
    assert memory.sites and set(memory.sites) <= set(MEMORY_SITES), \
        f"sites {memory.sites!r} must be a non-empty subset of hmlm.protocols.MEMORY_SITES"
    a, b, ab = (memory.block_spec(shape, r, 3) for r in (2, 5, 7))
    assert a.keys() == b.keys() == ab.keys() and a, "block_spec must name the same tensors for every r"
    for name, spec in ab.items():
        assert spec.shape[0] == 3, f"tensor {name!r}: the layer axis comes first (got shape {spec.shape} for 3 layers)"
        ax = spec.rank_axis
        assert 0 < ax < len(spec.shape), f"tensor {name!r}: rank_axis {ax} must be a non-layer axis of {spec.shape}"
        assert a[name].rank_axis == ax == b[name].rank_axis, f"tensor {name!r}: rank_axis must not depend on r"
        assert spec.shape[ax] == a[name].shape[ax] + b[name].shape[ax], \
            f"tensor {name!r}: size along rank_axis must grow linearly with r (blocks concatenate along it)"
        others = [s for i, s in enumerate(spec.shape) if i != ax]
        assert others == [s for i, s in enumerate(a[name].shape) if i != ax], \
            f"tensor {name!r}: axes other than rank_axis must not depend on r"


def check_zero_effect_at_init(memory: MemoryType) -> None:
    model = tiny_memory_model(memory)
    ids, paths = random_batch(model)
    base = model(ids, memory="none")
    for mode in ("fetched", "generic"):
        torch.testing.assert_close(model(ids, paths=paths, memory=mode), base, rtol=0, atol=0,
                                   msg=lambda m: f"memory={mode}: a freshly initialised memory must have no effect\n{m}")


def assert_per_sample_isolation(model, ids, paths, j: int, branching: int) -> None:
    """Moving sample j to other blocks changes sample j's output and leaves every other sample's bit-identical."""
    levels = paths.shape[1]
    base = model(ids, paths=paths, memory="fetched")
    moved = paths.clone()
    moved[j] = (moved[j] + 1) % torch.tensor([branching ** (lvl + 1) for lvl in range(levels)])
    out = model(ids, paths=moved, memory="fetched")
    for i in range(ids.shape[0]):
        if i == j:
            assert not torch.allclose(out[i], base[i]), f"sample {j} was moved to other blocks but its output did not change"
        else:
            torch.testing.assert_close(out[i], base[i], rtol=0, atol=0,
                                       msg=lambda m: f"sample {i} changed when only sample {j}'s blocks did\n{m}")


def check_per_sample_isolation(memory: MemoryType, seed: int = 1) -> None:
    model = tiny_memory_model(memory)
    randomize_bank(model, seed)
    ids, paths = random_batch(model, seed=seed)
    for j in range(ids.shape[0]):
        assert_per_sample_isolation(model, ids, paths, j, model.layout.branching)


def check_batched_equals_per_sample(memory: MemoryType, seed: int = 2) -> None:
    model = tiny_memory_model(memory)
    randomize_bank(model, seed)
    ids, paths = random_batch(model, seed=seed)
    batched = model(ids, paths=paths, memory="fetched")
    for i in range(ids.shape[0]):
        alone = model(ids[i:i + 1], paths=paths[i:i + 1], memory="fetched")
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"sample {i}: the batched output differs from the sample alone\n{m}")


def check_gradients_reach_only_fetched_blocks(memory: MemoryType, seed: int = 3) -> None:
    """From the zero-effect init, one step updates exactly the fetched blocks, and the memory then acts."""
    model = tiny_memory_model(memory)
    for p in model.anchor.parameters():
        p.requires_grad_(False)
    ids, paths = random_batch(model, b=3, seed=seed)
    logits = model(ids, paths=paths, memory="fetched", grad_memory=True)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    fetched = model.store.fetched_grads()
    active = model.layout.active_levels
    assert sorted(key for key, _, _ in fetched) == sorted(f"l{lvl}" for lvl in active), \
        f"fetched_grads lists {[k for k, _, _ in fetched]}, expected one group per level with memory"
    for key, rows, grad in fetched:
        want = sorted(set(paths[:, int(key[1:])].tolist()))
        assert sorted(rows.tolist()) == want, f"{key}: gradients for rows {sorted(rows.tolist())}, fetched {want}"
        assert grad.abs().sum() > 0, f"{key}: no gradient reaches the fetched blocks from the zero-effect init"
    before = {key: model.store.read_rows(key).params.clone() for key in model.store.keys()}
    model.store.step(lr=1e-2, weight_decay=0.1)
    for lvl in active:
        key = f"l{lvl}"
        after = model.store.read_rows(key).params
        touched = set(paths[:, lvl].tolist())
        for node in range(model.store.nodes(key)):
            same = torch.equal(before[key][node], after[node])
            assert same == (node not in touched), \
                f"block {key}[{node}] {'changed without being fetched' if not same else 'was fetched but not updated'}"
    assert not torch.allclose(model(ids, paths=paths, memory="fetched"), model(ids, memory="none")), \
        "after one update the memory still has no effect"


def check_memory_type(memory: MemoryType) -> None:
    """Every memory-type check (a fresh model per check)."""
    check_block_spec(memory)
    check_zero_effect_at_init(memory)
    check_gradients_reach_only_fetched_blocks(memory)
    check_per_sample_isolation(memory)
    check_batched_equals_per_sample(memory)


class MemoryTypeTests:
    """pytest mix-in: subclass as `class TestMine(MemoryTypeTests)` and set `plugin` (and `options`)."""

    plugin: Any = None                       # registry name of the memory type, or its class
    options: Mapping[str, Any] | None = None  # as under `memory.options` in a recipe

    def make(self) -> MemoryType:
        assert self.plugin is not None, "set `plugin` to the memory type's registry name or class"
        return make_plugin("memories", self.plugin, None, options=self.options)

    def test_protocol(self):
        assert isinstance(self.make(), MemoryType), "missing sites / block_spec / init_block / apply"

    def test_block_spec_concatenates_along_rank_axis(self):
        check_block_spec(self.make())

    def test_zero_effect_at_init(self):
        check_zero_effect_at_init(self.make())

    def test_gradients_reach_only_fetched_blocks(self):
        check_gradients_reach_only_fetched_blocks(self.make())

    def test_per_sample_isolation(self):
        check_per_sample_isolation(self.make())

    def test_batched_equals_per_sample(self):
        check_batched_equals_per_sample(self.make())

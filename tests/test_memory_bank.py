"""FFN memory + bank store: zero-init equals the anchor, gradients reach only fetched blocks, lazy AdamW leaves
untouched blocks and their optimizer state bit-identical, sizes match the paper. Per-sample isolation is tested for
every memory type in test_memory_types.py."""
from __future__ import annotations

import pytest
import torch

from hmlm.anchors.openlm import OpenLMAnchor, OpenLMConfig
from hmlm.bank.layout import BankLayout
from hmlm.bank.stores import DeviceStore, HostStore, TieredStore
from hmlm.memories.ffn import FFNMemory
from hmlm.model import MemoryLM

K, LEVELS = 3, 3


def tiny_anchor(seed: int = 0) -> OpenLMAnchor:
    torch.manual_seed(seed)
    return OpenLMAnchor(OpenLMConfig(n_layers=2, d_model=32, n_heads=2, head_dim=16, ffn_dim=64, vocab_size=97))


def make(sizes=(4, 2, 1), store_cls=DeviceStore, generic=True, layers=(0, 1), seed=0, **kw):
    anchor = tiny_anchor(seed)
    layout = BankLayout(FFNMemory(), anchor.shape, tuple(sizes), K, tuple(layers))
    return MemoryLM(anchor, layout, store_cls(layout, generic=generic, seed=seed, **kw))


def disk_store(tmp_path):
    """A store with every level on the disk tier (the generic block stays on the device)."""
    def build(layout, **kw):
        return TieredStore(layout, tiers=["disk"] * 3, disk_dir=tmp_path / "bank", **kw)
    return build


def batch(b=4, t=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (b, t), generator=g)
    paths = torch.stack([torch.randint(0, K ** (l + 1), (b,), generator=g) for l in range(LEVELS)], dim=1)
    return ids, paths


def test_zero_init_equals_anchor():
    model = make()
    ids, paths = batch()
    base = model(ids, memory="none")
    torch.testing.assert_close(model(ids, paths=paths, memory="fetched"), base, rtol=0, atol=0)
    torch.testing.assert_close(model(ids, paths=paths, memory="generic"), base, rtol=0, atol=0)


def test_sizes_match_paper_160m():
    from hmlm.protocols import AnchorShape

    shape = AnchorShape(n_layers=35, d_model=512, n_heads=12, head_dim=32, ffn_dim=2048)
    layout = BankLayout(FFNMemory(), shape, (256, 64, 16, 0), 16, tuple(range(35)))
    assert layout.fetched_params() == 18_063_360
    assert layout.bank_params() == 4_624_220_160
    assert layout.block_params(16) == 860_160  # paper App. D: one level-3 block of (0,0,16,0)


def test_fetch_concatenates_levels_per_sample():
    model = make()
    store = model.store
    _, paths = batch()
    fetched = store.fetch(paths)
    assert fetched["w1"].shape == (4, 2, 32, 7) and fetched["w3"].shape == (4, 2, 7, 32)
    for i in range(4):
        expect = torch.cat([store.tensors[f"l{l}"]["w1"][paths[i, l]] for l in range(3)], dim=-1)
        torch.testing.assert_close(fetched["w1"][i], expect)


def test_fetch_in_compute_dtype_is_layer_major_and_accumulates_gradients_in_float32():
    """fetch(dtype=bf16), what the model asks for under autocast: the fp32 values rounded once, each layer's slice
    contiguous (no per-layer copy or cast in the anchor), and the same leaf gradients as the fp32 fetch to bf16
    rounding -- summed in float32 over the samples that share a block."""
    model = make()
    store = model.store
    _, paths = batch(b=6)
    paths[:3, 0] = paths[0, 0]                      # three samples share one level-1 block
    mask = torch.tensor([False, True, False, False, True, False])
    g = torch.Generator().manual_seed(3)
    weights = {name: torch.randn(t.shape, generator=g) for name, t in store.fetch(paths).items()}
    got = {}
    for dtype in (torch.float32, torch.bfloat16):
        out = store.fetch(paths, generic_mask=mask, grad=True, dtype=dtype)
        for name, t in out.items():
            assert t.dtype == dtype and t.shape[:2] == (6, 2)
            assert all(s.is_contiguous() for s in t.unbind(1)), f"{name}: a layer's slice is strided"
        sum((t.float() * weights[name]).sum() for name, t in out.items()).backward()
        got[dtype] = ({n: t.detach() for n, t in out.items()}, {k: g.clone() for k, _, g in store.fetched_grads()})
        store.discard_fetched()
    (hi, hi_grad), (lo, lo_grad) = got[torch.float32], got[torch.bfloat16]
    for name in hi:
        torch.testing.assert_close(lo[name], hi[name].to(torch.bfloat16), rtol=0, atol=0)
    assert hi_grad.keys() == lo_grad.keys() == {"l0", "l1", "l2", "generic"}
    for key in hi_grad:
        assert lo_grad[key].dtype == torch.float32
        torch.testing.assert_close(lo_grad[key], hi_grad[key], rtol=1e-2, atol=1e-2)


def test_unique_passes_never_repeat_a_row():
    from hmlm.bank.gather import unique_passes as _unique_passes

    g = torch.Generator().manual_seed(0)
    for n in (1, 5, 16):
        index = torch.randint(0, 3, (n,), generator=g)
        passes = _unique_passes(index)
        assert sorted(torch.cat(passes).tolist()) == list(range(n))          # every position exactly once
        assert all(len(set(index[p].tolist())) == len(p) for p in passes)   # no row twice within a pass
        assert len(passes) == int(torch.bincount(index).max())


def _train_step(model, ids, paths, lr=1e-2, generic_mask=None):
    logits = model(ids, paths=paths, memory="fetched", grad_memory=True, generic_mask=generic_mask)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
    loss.backward()
    return model.store.step(lr=lr, weight_decay=0.1)


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_only_fetched_blocks_change_and_state_untouched(tier, tmp_path):
    store_cls = {"device": DeviceStore, "host": HostStore, "disk": disk_store(tmp_path)}[tier]
    model = make(store_cls=store_cls)
    for p in model.anchor.parameters():
        p.requires_grad_(False)
    ids, paths = batch()
    # two steps so optimizer state exists everywhere it will
    _train_step(model, ids, paths)
    before = {k: v.clone() for k, v in model.store.state_dict().items()}
    ids2, paths2 = batch(seed=5)
    _train_step(model, ids2, paths2)
    after = model.store.state_dict()
    for lvl in range(3):
        touched = set(paths2[:, lvl].tolist())
        for node in range(K ** (lvl + 1)):
            if node in touched:
                continue
            for suffix in ("blocks", "exp_avg", "exp_avg_sq"):
                key = f"l{lvl}.{suffix}"
                assert torch.equal(before[key][node], after[key][node]), f"untouched block l{lvl}[{node}] {suffix}"
        steps_before, steps_after = before[f"l{lvl}.steps"], after[f"l{lvl}.steps"]
        for node in range(K ** (lvl + 1)):
            assert int(steps_after[node] - steps_before[node]) == (1 if node in touched else 0)
    # the down projection of a fetched block moved away from zero
    node = int(paths2[0, 0])
    assert model.store.format_of("l0").named(after["l0.blocks"][node:node + 1])["w3"].abs().sum() > 0


def test_gradients_reach_only_fetched_blocks():
    model = make()
    ids, paths = batch(b=2)
    logits = model(ids, paths=paths, memory="fetched", grad_memory=True)
    logits.sum().backward()
    fetched = model.store.fetched_grads()
    assert [key for key, _, _ in fetched] == ["l0", "l1", "l2"]
    for key, rows, grad in fetched:
        lvl = int(key[1:])
        assert sorted(rows.tolist()) == sorted(set(paths[:, lvl].tolist()))
        assert grad.shape == (len(rows), model.store.format_of(key).numel)
    # bank tensors themselves are never part of autograd
    assert all(not t.requires_grad for _, _, t in model.store.iter_blocks())


def test_generic_mask_uses_generic_block_and_skips_paths():
    model = make()
    ids, paths = batch()
    mask = torch.tensor([True, False, True, False])
    _train_step(model, ids, paths, generic_mask=mask)
    st_ = model.store.state_dict()
    assert int(st_["generic.steps"][0]) == 1
    # only the non-generic samples' level-1 blocks were updated
    expect = set(paths[~mask, 0].tolist())
    assert {i for i, s in enumerate(st_["l0.steps"].tolist()) if s > 0} == expect


def test_placement_subset_of_layers():
    model = make(layers=(1,))
    assert model.store.tensors["l0"]["w1"].shape[1] == 1
    with torch.no_grad():
        model.store.tensors["l0"]["w3"].normal_()
    ids, paths = batch()
    out = model(ids, paths=paths, memory="fetched")
    assert not torch.allclose(out, model(ids, memory="none"))


def test_state_dict_round_trip(tmp_path):
    model = make()
    ids, paths = batch()
    _train_step(model, ids, paths)
    other = make(seed=3)
    other.store.load_state_dict(model.store.state_dict())
    for k, v in model.store.state_dict().items():
        assert torch.equal(v, other.store.state_dict()[k])
    model.store.save(tmp_path / "bank")
    third = make(seed=4)
    third.store.load(tmp_path / "bank")
    for key, name, t in model.store.iter_blocks():
        assert torch.equal(t, third.store.tensors[key][name])


def test_wrong_paths_give_clear_error():
    model = make()
    ids, paths = batch()
    paths[0, 0] = 99
    with pytest.raises(ValueError, match="level-1 node ids"):
        model(ids, paths=paths, memory="fetched")

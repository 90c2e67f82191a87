"""Every registered memory type (ffn, lora-qk, lora-vo, lora-ffn, kv): paper sizes, zero effect at initialisation,
concatenation over levels, per-sample isolation, gradients only to fetched blocks, state round trip, placement."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_per_sample_isolation
from hypothesis import given, settings
from hypothesis import strategies as st

from hmlm import registry
from hmlm.anchors.openlm import OpenLMAnchor, OpenLMConfig
from hmlm.bank.layout import BankLayout
from hmlm.bank.stores import DeviceStore
from hmlm.memories.lora import kaiming_uniform_bound
from hmlm.memories.placement import parse_placement
from hmlm.model import MemoryLM
from hmlm.protocols import MEMORY_SITES, AnchorShape, MemoryContext

TYPES = ("ffn", "lora-qk", "lora-vo", "lora-ffn", "kv")
NEW_TYPES = ("lora-qk", "lora-vo", "lora-ffn", "kv")
K, LEVELS, VOCAB, N_LAYERS = 3, 3, 97, 3


def paper_unit(kind: str, s: AnchorShape) -> int:
    """Fetched parameters per unit of r (paper §1.3)."""
    L, d, a, f = s.n_layers, s.d_model, s.attn_dim, s.ffn_dim
    return {"ffn": 3 * L * d, "lora-qk": 2 * L * (d + a), "lora-vo": 2 * L * (d + a),
            "lora-ffn": 3 * L * (d + f), "kv": 2 * L * a}[kind]


def memory(kind: str):
    return registry.get("memories", kind)()


def tiny_anchor(seed: int = 0) -> OpenLMAnchor:
    # attention width (2 x 8 = 16) differs from d (32) and from the FFN width (48), so a mixed-up axis fails
    torch.manual_seed(seed)
    return OpenLMAnchor(OpenLMConfig(n_layers=N_LAYERS, d_model=32, n_heads=2, head_dim=8, ffn_dim=48,
                                     vocab_size=VOCAB)).eval()


def make(kind: str, sizes=(4, 2, 1), layers=(0, 1, 2), seed=0) -> MemoryLM:
    anchor = tiny_anchor(seed)
    layout = BankLayout(memory(kind), anchor.shape, tuple(sizes), K, tuple(layers))
    return MemoryLM(anchor, layout, DeviceStore(layout, generic=True, seed=seed))


def zero_init_names(model: MemoryLM) -> list[str]:
    """Tensors that are all zeros at init (the ones that make the memory a no-op)."""
    blocks = model.store.tensors["l0"]
    return [n for n, t in blocks.items() if not t.any()]


def randomize(model: MemoryLM, seed: int) -> None:
    """Give the zero-initialised tensors random values so that the memory has an effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        names = zero_init_names(model)
        for key, d in model.store.tensors.items():
            for name in names:
                d[name].normal_(generator=g)


def batch(b=4, t=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    paths = torch.stack([torch.randint(0, K ** (l + 1), (b,), generator=g) for l in range(LEVELS)], dim=1)
    return ids, paths


# ---------------------------------------------------------------- registration and sizes

def test_registered_with_sites_the_anchor_exposes():
    for kind in TYPES:
        mem = memory(kind)
        assert mem.sites and set(mem.sites) <= set(MEMORY_SITES), kind


@pytest.mark.parametrize("kind", TYPES)
def test_fetched_size_matches_paper_formula_160m(kind):
    shape = AnchorShape(n_layers=35, d_model=512, n_heads=12, head_dim=32, ffn_dim=2048)
    layout = BankLayout(memory(kind), shape, (256, 64, 16, 0), 16, tuple(range(35)))
    unit = paper_unit(kind, shape)
    assert layout.block_params(1) == unit
    assert layout.fetched_params() == 336 * unit
    assert layout.bank_params() == 86_016 * unit        # Σ 16^l r_l = 86,016 units for every 4.6B config
    if kind == "ffn":
        assert layout.fetched_params() == 18_063_360


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(TYPES), L=st.integers(1, 6), d=st.integers(1, 64), h=st.integers(1, 4),
       dh=st.integers(1, 16), f=st.integers(1, 96), r=st.integers(1, 9), n=st.integers(1, 6))
def test_block_size_formula_any_shape(kind, L, d, h, dh, f, r, n):
    """|block(r)| = r x (unit per layer) x memory layers, and every tensor grows along its rank axis only."""
    shape = AnchorShape(n_layers=L, d_model=d, n_heads=h, head_dim=2 * dh, ffn_dim=f)
    layers = tuple(range(min(n, L)))
    layout = BankLayout(memory(kind), shape, (r,), 2, layers)
    one_layer = AnchorShape(n_layers=1, d_model=d, n_heads=h, head_dim=2 * dh, ffn_dim=f)
    assert layout.block_params(r) == r * len(layers) * paper_unit(kind, one_layer)
    spec_r, spec_1 = layout.spec(r), layout.spec(1)
    for name, s in spec_r.items():
        assert s.shape[0] == len(layers)
        grown = [i for i, (a, b) in enumerate(zip(s.shape, spec_1[name].shape)) if a != b]
        assert grown in ([s.rank_axis], []) and s.shape[s.rank_axis] == r * spec_1[name].shape[s.rank_axis]


# ---------------------------------------------------------------- initialisation

@pytest.mark.parametrize("kind", TYPES)
def test_zero_init_equals_anchor(kind):
    model = make(kind)
    ids, paths = batch()
    base = model(ids, memory="none")
    torch.testing.assert_close(model(ids, paths=paths, memory="fetched"), base, rtol=0, atol=0)
    torch.testing.assert_close(model(ids, paths=paths, memory="generic"), base, rtol=0, atol=0)
    assert zero_init_names(model)


@pytest.mark.parametrize("kind", NEW_TYPES)
def test_init_distributions_seeded(kind):
    a, b, c = make(kind, seed=0), make(kind, seed=0), make(kind, seed=1)
    for key, name, t in a.store.iter_blocks():
        assert torch.equal(t, b.store.tensors[key][name])
        if t.any():
            assert not torch.equal(t, c.store.tensors[key][name])
    blocks = make(kind, sizes=(64, 0, 0)).store.tensors["l0"]
    if kind == "kv":
        keys = blocks["keys"]
        assert keys.abs().max() <= 0.04 + 1e-7 and keys.std().item() == pytest.approx(0.02 * 0.88, rel=0.1)
        assert not blocks["values"].any()
        return
    for name, t in blocks.items():
        if name.endswith("_b"):
            assert not t.any()
            continue
        # Kaiming-uniform as PEFT: the bound of kaiming_uniform_(a=√5) on the [r, d_in] matrix
        ref = torch.empty(64, t.shape[-2])
        torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5), generator=torch.Generator().manual_seed(0))
        bound = kaiming_uniform_bound(t.shape[-2])
        assert ref.abs().max() <= bound and t.abs().max() <= bound and t.abs().max() > 0.9 * bound


# ---------------------------------------------------------------- concatenation over levels

@pytest.mark.parametrize("kind", ("lora-qk", "lora-vo", "lora-ffn"))
def test_lora_concatenation_is_sum_of_level_patches(kind):
    """A path's fetched LoRA equals α Σ_l x A_l B_l: one LoRA of rank Σ r_l."""
    model = make(kind)
    randomize(model, seed=3)
    mem = model.layout.memory
    _, paths = batch()
    fetched = model.store.fetch(paths)
    for site in mem.sites:
        prefix = mem.prefixes[site]
        d_in = fetched[f"{prefix}_a"].shape[-2]
        x = torch.randn(paths.shape[0], 5, d_in, generator=torch.Generator().manual_seed(4))
        out = mem.apply(site, 1, x, {n: t[:, 1] for n, t in fetched.items()})   # layer slot 1's tensors
        expect = torch.zeros_like(out)
        for i in range(paths.shape[0]):
            for lvl in range(LEVELS):
                blk = model.store.tensors[f"l{lvl}"]
                a, b = blk[f"{prefix}_a"][paths[i, lvl], 1], blk[f"{prefix}_b"][paths[i, lvl], 1]
                expect[i] += mem.alpha * x[i] @ a @ b
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_kv_softmax_runs_over_all_slots_of_the_path():
    model = make("kv", sizes=(3, 2, 1))
    randomize(model, seed=5)
    mem = model.layout.memory
    _, paths = batch(b=2)
    fetched = model.store.fetch(paths)
    H, dh = 2, 8
    q = torch.randn(2, H, 6, dh, generator=torch.Generator().manual_seed(6))
    out = mem.apply("attn_kv", 2, q, {n: t[:, 2] for n, t in fetched.items()})
    for i in range(2):
        keys = torch.cat([model.store.tensors[f"l{l}"]["keys"][paths[i, l], 2] for l in range(LEVELS)])    # [6, H*dh]
        vals = torch.cat([model.store.tensors[f"l{l}"]["values"][paths[i, l], 2] for l in range(LEVELS)])
        for h in range(H):
            k, v = keys[:, h * dh:(h + 1) * dh], vals[:, h * dh:(h + 1) * dh]
            p = torch.softmax(q[i, h] @ k.T / math.sqrt(dh), dim=-1)     # [T, 6]: no mask, one softmax over R = 6
            torch.testing.assert_close(out[i, h], p @ v, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- isolation, gradients, updates

@settings(max_examples=6, deadline=None)
@given(kind=st.sampled_from(TYPES), j=st.integers(0, 3), seed=st.integers(0, 1000))
def test_per_sample_isolation(kind, j, seed):
    """Changing sample j's memory never changes another sample's output."""
    model = make(kind)
    randomize(model, seed)
    ids, paths = batch()
    assert_per_sample_isolation(model, ids, paths, j, K)


def _train_step(model, ids, paths, lr=1e-2):
    logits = model(ids, paths=paths, memory="fetched", grad_memory=True)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    return model.store.step(lr=lr, weight_decay=0.1)


@pytest.mark.parametrize("kind", NEW_TYPES)
def test_gradients_and_updates_reach_only_fetched_blocks(kind):
    model = make(kind)
    for p in model.anchor.parameters():
        p.requires_grad_(False)
    zeros = zero_init_names(model)
    ids, paths = batch(b=3)
    logits = model(ids, paths=paths, memory="fetched", grad_memory=True)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    fetched = model.store.fetched_grads()
    assert [key for key, _, _ in fetched] == ["l0", "l1", "l2"]
    for key, rows, grad in fetched:
        assert sorted(rows.tolist()) == sorted(set(paths[:, int(key[1:])].tolist()))
        named = model.store.format_of(key).named(grad)
        # the zero-initialised tensor is what learns first (the others get zero gradient through it)
        assert all(named[n].abs().sum() > 0 for n in zeros)
    before = {k: v.clone() for k, v in model.store.state_dict().items()}
    model.store.step(lr=1e-2, weight_decay=0.1)
    after = model.store.state_dict()
    for lvl in range(LEVELS):
        touched = set(paths[:, lvl].tolist())
        fmt = model.store.format_of(f"l{lvl}")
        old, new = fmt.named(before[f"l{lvl}.blocks"]), fmt.named(after[f"l{lvl}.blocks"])
        for name in old:
            for node in range(K ** (lvl + 1)):
                same = torch.equal(old[name][node], new[name][node])
                if node not in touched:
                    assert same, f"untouched block l{lvl}[{node}].{name} changed"
                elif name in zeros:
                    assert not same, f"fetched block l{lvl}[{node}].{name} did not learn"
    assert all(not t.requires_grad for _, _, t in model.store.iter_blocks())
    # after one step the memory acts, so the model is no longer the anchor
    assert not torch.allclose(model(ids, paths=paths, memory="fetched"), model(ids, memory="none"))


@pytest.mark.parametrize("kind", NEW_TYPES)
def test_state_dict_round_trip(kind, tmp_path):
    model = make(kind)
    ids, paths = batch()
    _train_step(model, ids, paths)
    other = make(kind, seed=3)
    other.store.load_state_dict(model.store.state_dict())
    for k, v in model.store.state_dict().items():
        assert torch.equal(v, other.store.state_dict()[k]), k
    model.store.save(tmp_path / "bank")
    third = make(kind, seed=4)
    third.anchor.load_state_dict(model.anchor.state_dict())
    third.store.load(tmp_path / "bank")
    for key, name, t in model.store.iter_blocks():
        assert torch.equal(t, third.store.tensors[key][name])
    torch.testing.assert_close(third(ids, paths=paths, memory="fetched"), model(ids, paths=paths, memory="fetched"),
                               rtol=0, atol=0)


# ---------------------------------------------------------------- placement

class RecordingContext(MemoryContext):
    """Records the anchor layers whose memory sites produced a delta."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layers_called: set[int] = set()

    def delta(self, site, layer, x):
        out = super().delta(site, layer, x)
        if out is not None:
            self.layers_called.add(layer)
        return out


def block_outputs(anchor, ids, ctx) -> dict[int, torch.Tensor]:
    outs: dict[int, torch.Tensor] = {}
    hooks = [blk.register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o))
             for n, blk in enumerate(anchor.blocks)]
    try:
        anchor(ids, memory=ctx)
    finally:
        for h in hooks:
            h.remove()
    return outs


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("placement, expected", [("all", [0, 1, 2]), ("first:1", [0]), ("middle:1", [1]),
                                                 ("last:2", [1, 2]), ("layers:0,2", [0, 2])])
def test_placement_selects_layers(kind, placement, expected):
    layers = parse_placement(placement, N_LAYERS)
    assert layers == expected
    model = make(kind, layers=layers)
    randomize(model, seed=7)
    assert all(t.shape[1] == len(layers) for t in model.store.tensors["l0"].values())
    ids, paths = batch(b=2)
    ctx = RecordingContext(model.layout.memory, model.store.fetch(paths), model.layout.layers)
    outs, base = block_outputs(model.anchor, ids, ctx), block_outputs(model.anchor, ids, None)
    assert sorted(ctx.layers_called) == expected
    # every block before the first memory layer is the anchor's; the first memory layer changes its output
    for n in range(N_LAYERS):
        if n < expected[0]:
            torch.testing.assert_close(outs[n], base[n], rtol=0, atol=0)
    assert not torch.allclose(outs[expected[0]], base[expected[0]])


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def shared_index(tmp_path_factory):
    return tmp_path_factory.mktemp("memory-types-index") / "index"


@pytest.mark.parametrize("kind", NEW_TYPES)
def test_fit_and_reload_every_type(kind, tiny_recipe, tmp_path, shared_index):
    """Each type trains through `hmlm fit` (co-training, generic sampling) and its model directory reloads."""
    from hmlm.export import load_model_dir
    from hmlm.train.fit import fit

    recipe = tiny_recipe(**{"memory.type": kind, "trainer.mode": "cotrain", "trainer.max_steps": 3,
                            "index.dir": str(shared_index), "out_dir": str(tmp_path / kind)})
    result = fit(recipe, progress=False, final_eval=False)
    loaded = load_model_dir(result["model_dir"])
    assert type(loaded.model.layout.memory).__name__ == type(memory(kind)).__name__
    trained = [t for key, name, t in loaded.model.store.iter_blocks() if name in ("values", "q_b", "k_b", "v_b",
                                                                                  "o_b", "gate_b", "up_b", "down_b")]
    assert trained and any(t.any() for t in trained)

"""The `hf` anchor (a transformers causal LM with memory hooks): zero-init memory equals the bare HF model, per-sample
isolation, gradients only to fetched blocks, doc_ids refused, meta-device counts, weights from a local
save_pretrained directory, and a few `hmlm fit` steps with a frozen random anchor. Tiny random configs, offline."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_per_sample_isolation
from hypothesis import given, settings
from hypothesis import strategies as st

from hmlm import registry
from hmlm.anchors.hf import HFAnchor
from hmlm.bank.layout import BankLayout
from hmlm.bank.stores import DeviceStore
from hmlm.config import AnchorConfig, RecipeError, recipe_from_dict
from hmlm.model import MemoryLM, build_anchor

K, LEVELS, VOCAB = 3, 3, 97
# grouped-query attention (4 query heads, 2 kv heads) as in the real models; qwen2 adds q/k/v biases
ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True, max_position_embeddings=128)
MODEL_TYPES = ("llama", "qwen2")


def options(model_type: str = "llama", **extra) -> HFAnchor.Options:
    return HFAnchor.Options(model_type=model_type, config={**ARCH, **extra})


def tiny_anchor(model_type: str = "llama", seed: int = 0, **extra) -> HFAnchor:
    torch.manual_seed(seed)
    anchor = HFAnchor.from_config(AnchorConfig(name="hf"), vocab_size=VOCAB, options=options(model_type, **extra))
    return anchor.eval()


def make(model_type: str = "llama", kind: str = "ffn", sizes=(4, 2, 1), seed: int = 0, **extra) -> MemoryLM:
    anchor = tiny_anchor(model_type, seed, **extra)
    layout = BankLayout(registry.get("memories", kind)(), anchor.shape, tuple(sizes), K, (0, 1))
    return MemoryLM(anchor, layout, DeviceStore(layout, generic=True, seed=seed))


def randomize(model: MemoryLM, seed: int) -> None:
    """Give the zero-initialised tensors random values so that the memory acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        zeros = [n for n, t in model.store.tensors["l0"].items() if not t.any()]
        for blocks in model.store.tensors.values():
            for name in zeros:
                blocks[name].normal_(generator=g)


def batch(b: int = 4, t: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    paths = torch.stack([torch.randint(0, K ** (l + 1), (b,), generator=g) for l in range(LEVELS)], dim=1)
    return ids, paths


def test_registered_shape_and_sites():
    assert registry.get("anchors", "hf") is HFAnchor
    a = tiny_anchor("gemma3_text", head_dim=16)
    assert (a.shape.n_layers, a.shape.d_model, a.shape.n_heads, a.shape.head_dim, a.shape.ffn_dim) == (2, 32, 4, 16, 64)
    assert a.config.vocab_size == VOCAB
    assert tiny_anchor("qwen2").shape.head_dim == 8             # no head_dim in the config: hidden / heads
    assert set(a.sites) == {"ffn", "ffn_gate", "ffn_up", "ffn_down", "attn_q", "attn_k", "attn_v", "attn_o"}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("kind", ["ffn", "lora-ffn"])
def test_zero_init_memory_equals_bare_hf_model(model_type, kind):
    model = make(model_type, kind)
    ids, paths = batch()
    bare = model.anchor.model(input_ids=ids).logits
    torch.testing.assert_close(model(ids, paths=paths, memory="fetched"), bare, rtol=0, atol=0)
    torch.testing.assert_close(model(ids, paths=paths, memory="generic"), bare, rtol=0, atol=0)
    randomize(model, seed=3)
    assert not torch.allclose(model(ids, paths=paths, memory="fetched"), bare)
    # the hooks forget the memory after each call: a plain call afterwards is the bare model again
    torch.testing.assert_close(model(ids, memory="none"), bare, rtol=0, atol=0)


@settings(max_examples=6, deadline=None)
@given(model_type=st.sampled_from(MODEL_TYPES), j=st.integers(0, 3), seed=st.integers(0, 1000))
def test_per_sample_isolation(model_type, j, seed):
    """Changing sample j's memory never changes another sample's output; a batch equals its samples alone."""
    model = make(model_type)
    randomize(model, seed)
    ids, paths = batch()
    assert_per_sample_isolation(model, ids, paths, j, K)
    base = model(ids, paths=paths, memory="fetched")
    alone = model(ids[j:j + 1], paths=paths[j:j + 1], memory="fetched")
    torch.testing.assert_close(alone[0], base[j], rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_fetched_blocks():
    model = make("qwen2")
    for p in model.anchor.parameters():
        p.requires_grad_(False)
    ids, paths = batch(b=3)
    logits = model(ids, paths=paths, memory="fetched", grad_memory=True)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    fetched = model.store.fetched_grads()
    assert [key for key, _, _ in fetched] == ["l0", "l1", "l2"]
    for key, rows, grad in fetched:
        assert sorted(rows.tolist()) == sorted(set(paths[:, int(key[1:])].tolist()))
        # the zero-initialised down projection learns first
        assert model.store.format_of(key).named(grad)["w3"].abs().sum() > 0
    assert all(p.grad is None for p in model.anchor.parameters())
    before = {k: v.clone() for k, v in model.store.state_dict().items()}
    model.store.step(lr=1e-2, weight_decay=0.1)
    after = model.store.state_dict()
    for lvl in range(LEVELS):
        touched = set(paths[:, lvl].tolist())
        for node in range(K ** (lvl + 1)):
            old, new = (model.store.format_of(f"l{lvl}").named(s[f"l{lvl}.blocks"])["w3"] for s in (before, after))
            same = torch.equal(old[node], new[node])
            assert same == (node not in touched), f"block l{lvl}[{node}]"


def test_doc_ids_and_unavailable_sites_are_refused():
    model = make("llama")
    ids, paths = batch()
    with pytest.raises(ValueError, match="data.doc_mask: false"):
        model(ids, paths=paths, doc_ids=torch.zeros_like(ids))
    with pytest.raises(RecipeError, match="data.doc_mask"):
        recipe_from_dict({"name": "x", "anchor": {"name": "hf", "options": {"model_type": "llama"}}})
    # grouped-query attention: k/v are narrower than n_heads * head_dim, so lora-vo cannot attach
    with pytest.raises(ValueError, match="num_key_value_heads"):
        make("llama", "lora-vo")(ids, paths=paths, memory="fetched")
    with pytest.raises(ValueError, match="attn_kv"):
        make("llama", "kv")(ids, paths=paths, memory="fetched")
    # with as many kv heads as query heads lora-vo attaches and is a no-op at init
    mha = make("llama", "lora-vo", num_key_value_heads=4)
    torch.testing.assert_close(mha(ids, paths=paths, memory="fetched"), mha(ids, memory="none"), rtol=0, atol=0)


def test_recipe_errors_name_the_key():
    with pytest.raises(RecipeError, match="anchor.options.model_type"):
        HFAnchor.from_config(AnchorConfig(name="hf"), vocab_size=VOCAB)
    with pytest.raises(RecipeError, match="unknown key.*hiden_size"):
        HFAnchor.from_config(AnchorConfig(name="hf"), vocab_size=VOCAB,
                             options=HFAnchor.Options(model_type="llama", config={"hiden_size": 8}))
    # an openlm option under an hf anchor: refused when the recipe is loaded, naming the key and the hf options
    with pytest.raises(RecipeError, match=r"unknown key `anchor.options.n_layers`; known keys under `anchor.options`: "
                                          r"model_type, config"):
        recipe_from_dict({"name": "x", "data": {"doc_mask": False},
                          "anchor": {"name": "hf", "options": {"model_type": "llama", "n_layers": 2}}})
    with pytest.raises(RecipeError, match="smaller than the tokenizer"):
        HFAnchor.from_config(AnchorConfig(name="hf"), vocab_size=VOCAB, options=options(vocab_size=50))


def test_meta_device_counts_equal_real_counts():
    from hmlm.model import size_report

    recipe = recipe_from_dict({"name": "x", "data": {"doc_mask": False},
                               "index": {"router": {"branching": K, "levels": LEVELS}},
                               "anchor": {"name": "hf", "options": {"model_type": "qwen2", "config": ARCH}},
                               "memory": {"sizes": [4, 2, 1]}, "trainer": {"mode": "memory"}})
    meta = build_anchor(recipe, VOCAB, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    real = tiny_anchor("qwen2")
    assert meta.num_params() == real.num_params() == sum(p.numel() for p in real.model.parameters())
    rep = size_report(recipe, VOCAB)
    assert rep["anchor_params"] == real.num_params()
    assert rep["fetched_params_per_sequence"] == 3 * (4 + 2 + 1) * 2 * 32           # 3 r L d


def test_load_pretrained_from_local_dir(tmp_path):
    from hmlm.train.fit import FitError, init_anchor_from

    src = tiny_anchor("llama", seed=7)
    src.model.save_pretrained(tmp_path / "ckpt")
    model = make("llama", seed=0)
    assert not torch.equal(model.anchor.model.lm_head.weight, src.model.lm_head.weight)
    init_anchor_from(model, str(tmp_path / "ckpt"))
    for k, v in src.model.state_dict().items():
        assert torch.equal(model.anchor.model.state_dict()[k], v), k
    # a checkpoint of another network: the error lists what differs
    other = tiny_anchor("llama", seed=1, rms_norm_eps=1e-3)
    other.model.save_pretrained(tmp_path / "other")
    with pytest.raises(FitError, match="rms_norm_eps"):
        init_anchor_from(model, str(tmp_path / "other"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FitError, match="config.json"):
        init_anchor_from(model, str(tmp_path / "empty"))


def test_fit_frozen_hf_anchor_and_reload(tiny_recipe, tmp_path):
    """A few `hmlm fit` steps in memory mode: the anchor stays as built, the bank learns, the model dir reloads."""
    from hmlm.export import load_model_dir
    from hmlm.train.fit import fit

    recipe = tiny_recipe(**{"anchor": {"name": "hf", "options": {"model_type": "llama", "config": ARCH}},
                            "data.doc_mask": False, "trainer.mode": "memory", "trainer.max_steps": 3,
                            "trainer.val_every": 3, "trainer.ckpt_every": 3, "trainer.val_batches": 1})
    result = fit(recipe, progress=False, final_eval=False)
    assert result["steps"] == 3
    loaded = load_model_dir(result["model_dir"]).model
    assert isinstance(loaded.anchor, HFAnchor)
    torch.manual_seed(recipe.seed)       # build_model seeds the same way: the frozen anchor is exactly as built
    fresh = build_anchor(recipe, loaded.anchor.config.vocab_size)
    for k, v in fresh.state_dict().items():
        assert torch.equal(loaded.anchor.state_dict()[k], v), k
    assert any(t.any() for key, name, t in loaded.store.iter_blocks() if name == "w3")

"""The OpenLM anchor: exact paper parameter counts, causality, per-document packing, memory sites."""
from __future__ import annotations

import math
from typing import Mapping

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hmlm.anchors.openlm import PRESETS, OpenLMAnchor, OpenLMConfig, document_mask
from hmlm.config import AnchorConfig
from hmlm.protocols import MEMORY_SITES, Anchor, MemoryContext

VOCAB = 97


def small(**over) -> OpenLMAnchor:
    torch.manual_seed(0)
    kw = dict(n_layers=3, d_model=32, n_heads=4, head_dim=8, ffn_dim=48, vocab_size=VOCAB, tied_embeddings=True)
    kw.update(over)
    return OpenLMAnchor(OpenLMConfig(**kw)).eval()


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- parameter counts (paper Tables 4-6, 8)

@pytest.mark.parametrize("preset,layers,expected", [
    ("160m", None, 163_510_016),
    ("410m", None, 411_665_408),
    ("1.4b", None, 1_439_893_504),
    ("410m", 12, 257_475_584),   # Table 8's 260M anchor: 410M architecture with 12 layers
])
def test_paper_parameter_counts(preset: str, layers: int | None, expected: int) -> None:
    with torch.device("meta"):
        model = OpenLMAnchor.from_config(AnchorConfig(), vocab_size=50_432,
                                         options=OpenLMAnchor.Options(preset=preset, n_layers=layers))
    assert model.num_params() == expected


def test_from_config_overrides_and_errors() -> None:
    m = OpenLMAnchor.from_config(AnchorConfig(), vocab_size=100,
                                 options=OpenLMAnchor.Options(preset="tiny", n_layers=2, rope_base=500.0))
    assert (m.config.n_layers, m.config.d_model, m.config.vocab_size, m.config.rope_base) == (2, 128, 100, 500.0)
    assert m.shape.n_layers == 2 and m.shape.attn_dim == 128 and m.shape.ffn_dim == 384
    assert isinstance(m, Anchor)
    with torch.device("meta"):
        assert OpenLMAnchor.from_config(AnchorConfig(vocab_size=64), vocab_size=100).config.vocab_size == 64
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny"):
        OpenLMAnchor.Options(preset="huge")
    with pytest.raises(ValueError, match="head_dim must be even"):
        OpenLMAnchor.from_config(AnchorConfig(), vocab_size=100, options=OpenLMAnchor.Options(head_dim=7))
    assert set(PRESETS) == {"tiny", "160m", "410m", "1.4b"}


# ---------------------------------------------------------------- structure and init

def test_tied_and_untied_heads() -> None:
    tied, untied = small(), small(tied_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == VOCAB * 32
    assert not any(n.endswith("bias") for n, _ in tied.named_parameters())


def test_init_scales() -> None:
    m = small(n_layers=8, d_model=256, n_heads=8, head_dim=32, ffn_dim=512)
    std = 0.02
    for part in (*m.blocks[0].attn.qkv.weight.chunk(3), *m.blocks[3].ffn.w12.weight.chunk(2)):
        assert part.std().item() == pytest.approx(std, rel=0.05)
    for w in (m.blocks[0].attn.o_proj.weight, m.blocks[5].ffn.w3.weight):
        assert w.std().item() == pytest.approx(std / math.sqrt(16), rel=0.05)
    assert torch.equal(m.blocks[0].attn.q_norm.weight, torch.ones(256))
    assert torch.equal(m.norm.weight, torch.ones(256))


# ---------------------------------------------------------------- forward behaviour

def test_forward_shape_and_causality() -> None:
    m = small()
    ids = tokens(2, 10)
    logits = m(ids)
    assert logits.shape == (2, 10, VOCAB) and logits.dtype == torch.float32
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % VOCAB
    out = m(changed)
    torch.testing.assert_close(out[:, :6], logits[:, :6], rtol=0, atol=0)
    assert not torch.allclose(out[:, 6:], logits[:, 6:])


def test_precomputed_rope_tables_equal_computed_ones() -> None:
    """The buffer rows (what a compiled step reads) and the per-forward computation (sequences beyond the table, a
    model cast to bf16) give bit-identical logits, for plain and packed positions and with a cache."""
    m = small()
    ids, doc_ids = tokens(2, 12), torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    from_table = (m(ids), m(ids, doc_ids=doc_ids))
    cache = m.new_cache()
    m(ids[:, :7], cache=cache)
    step_from_table = m(ids[:, 7:], cache=cache)
    full = (m.rope_cos, m.rope_sin)
    m.rope_cos, m.rope_sin = full[0][:4], full[1][:4]   # shorter than the sequences: computed per forward
    torch.testing.assert_close(m(ids), from_table[0], rtol=0, atol=0)
    torch.testing.assert_close(m(ids, doc_ids=doc_ids), from_table[1], rtol=0, atol=0)
    cache = m.new_cache()
    m(ids[:, :7], cache=cache)
    torch.testing.assert_close(m(ids[:, 7:], cache=cache), step_from_table, rtol=0, atol=0)
    m.rope_cos, m.rope_sin = full
    assert "rope_cos" not in m.state_dict()          # a function of the config, never in checkpoints


def test_packed_documents_match_documents_alone() -> None:
    m = small()
    a, b = tokens(1, 5, seed=2), tokens(1, 7, seed=3)
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    out = m(packed, doc_ids=doc_ids)
    torch.testing.assert_close(out[:, :5], m(a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 5:], m(b), rtol=1e-5, atol=1e-5)
    # without doc_ids docB sees docA and sits at shifted positions
    assert not torch.allclose(m(packed)[:, 5:], m(b), atol=1e-3)


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4), pad=st.integers(0, 3))
def test_packing_property(lengths: list[int], pad: int) -> None:
    """Any packing of documents (with a padded tail) gives each document its stand-alone logits."""
    m = small(n_layers=2)
    docs = [tokens(1, n, seed=i + 10) for i, n in enumerate(lengths)]
    ids = torch.cat(docs + [torch.zeros(1, pad, dtype=torch.long)], dim=1)
    doc_ids = torch.tensor([[i for i, n in enumerate(lengths) for _ in range(n)] + [-1] * pad])
    out = m(ids.repeat(2, 1), doc_ids=doc_ids.repeat(2, 1))
    assert torch.isfinite(out).all()
    start = 0
    for doc in docs:
        n = doc.shape[1]
        torch.testing.assert_close(out[:1, start:start + n], m(doc), rtol=1e-5, atol=1e-5)
        start += n


def test_document_mask_padding_and_positions() -> None:
    mask, pos = document_mask(torch.tensor([[0, 0, 1, 1, 1, -1, -1]]))
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0, 0]]
    m = mask[0, 0]
    assert m[4].tolist() == [False, False, True, True, True, False, False]
    assert m[6].tolist() == [False] * 6 + [True]   # padding attends to itself only
    assert m.sum(-1).min() >= 1


def test_gradients_flow_and_autocast() -> None:
    m = small(tied_embeddings=False).train()
    ids = tokens(2, 9)
    logits = m(ids[:, :-1], doc_ids=torch.tensor([[0] * 4 + [1] * 4, [0] * 8]))
    F = torch.nn.functional
    F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ---------------------------------------------------------------- memory sites

class FakeMemory:
    """Adds scale[b] * a fixed pattern at every site; records what the anchor passed in."""

    sites = MEMORY_SITES

    def __init__(self, d_model: int, attn_dim: int, ffn_dim: int = 48):
        self.out_width = {"attn_q": attn_dim, "attn_k": attn_dim, "attn_v": attn_dim,
                          "attn_o": d_model, "ffn": d_model,
                          "ffn_gate": ffn_dim, "ffn_up": ffn_dim, "ffn_down": d_model}
        self.calls: list[tuple[str, int, tuple[int, ...]]] = []
        self.inputs: dict[tuple[str, int], torch.Tensor] = {}

    def apply(self, site: str, slot: int, x: torch.Tensor, fetched: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.calls.append((site, slot, tuple(x.shape)))
        self.inputs[(site, slot)] = x.detach()
        if site == "attn_kv":
            out_shape = x.shape
        else:
            out_shape = (*x.shape[:-1], self.out_width[site])
        pattern = torch.linspace(-1, 1, out_shape[-1])
        scale = fetched["scale"].view(-1, *[1] * (len(out_shape) - 1))
        return scale * pattern.expand(out_shape)


def test_memory_sites_shapes_inputs_and_effect() -> None:
    m = small()
    B, T, H, dh, d = 2, 6, 4, 8, 32
    ids = tokens(B, T)
    base = m(ids)
    layers = [0, 2]
    fake = FakeMemory(d, H * dh)

    # capture what the documented site inputs must equal, for layer 0
    seen: dict[str, torch.Tensor] = {}
    blk = m.blocks[0]
    hooks = [
        blk.attn_norm.register_forward_hook(lambda mod, i, o: seen.__setitem__("attn_in", o)),
        blk.ffn_norm.register_forward_hook(lambda mod, i, o: seen.__setitem__("ffn_in", o)),
        blk.attn.q_norm.register_forward_hook(lambda mod, i, o: seen.__setitem__("q_normed", o)),
        blk.attn.o_proj.register_forward_pre_hook(lambda mod, i: seen.__setitem__("o_in", i[0])),
        blk.ffn.w3.register_forward_pre_hook(lambda mod, i: seen.__setitem__("ffn_hidden", i[0])),
    ]
    zero = m(ids, memory=MemoryContext(fake, {"scale": torch.zeros(B, len(layers))}, layers))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(zero, base, rtol=0, atol=0)

    expected_shapes = {"attn_q": (B, T, d), "attn_k": (B, T, d), "attn_v": (B, T, d),
                       "attn_kv": (B, H, T, dh), "attn_o": (B, T, H * dh), "ffn": (B, T, d),
                       "ffn_gate": (B, T, d), "ffn_up": (B, T, d), "ffn_down": (B, T, 48)}
    assert sorted(fake.calls) == sorted((s, slot, expected_shapes[s]) for slot in range(len(layers))
                                        for s in MEMORY_SITES)
    torch.testing.assert_close(fake.inputs[("attn_q", 0)], seen["attn_in"])
    torch.testing.assert_close(fake.inputs[("ffn", 0)], seen["ffn_in"])
    torch.testing.assert_close(fake.inputs[("attn_o", 0)], seen["o_in"])
    for site in ("ffn_gate", "ffn_up"):
        torch.testing.assert_close(fake.inputs[(site, 0)], seen["ffn_in"])
    torch.testing.assert_close(fake.inputs[("ffn_down", 0)], seen["ffn_hidden"])   # the SwiGLU hidden
    # attn_kv sees q after QK-norm and before RoPE (RoPE would change every position > 0)
    torch.testing.assert_close(fake.inputs[("attn_kv", 0)], seen["q_normed"].view(B, T, H, dh).transpose(1, 2))

    for site in MEMORY_SITES:
        one = FakeMemory(d, H * dh)
        one.sites = (site,)
        out = m(ids, memory=MemoryContext(one, {"scale": torch.tensor([0.0, 0.5]).repeat(len(layers), 1).T}, layers))
        torch.testing.assert_close(out[0], base[0], rtol=1e-6, atol=1e-6)   # sample with zero delta unchanged
        assert not torch.allclose(out[1], base[1], atol=1e-4), site

"""The fast training paths compute what the plain ones did: fused projections, fused norms and RoPE, document
positions without the T x T mask, flex attention, the chunked fused cross-entropy, the shared training step and its
compiled form. The unfused anchor of before the speed work is kept below as the reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_model, save_file
from torch import nn

from hmlm.anchors.openlm import OpenLMAnchor, OpenLMConfig, document_mask, document_positions, rope_tables
from hmlm.loss import linear_cross_entropy, lm_nll, token_weights, weighted_cross_entropy
from hmlm.protocols import MemoryContext

VOCAB = 61


def small(**kw) -> OpenLMAnchor:
    torch.manual_seed(0)
    cfg = dict(n_layers=3, d_model=32, n_heads=4, head_dim=8, ffn_dim=48, vocab_size=VOCAB)
    cfg.update(kw)
    return OpenLMAnchor(OpenLMConfig(**cfg))


def tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the unfused reference (the anchor before fusion)

def _ref_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def _ref_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def reference_logits(state: dict[str, torch.Tensor], cfg: OpenLMConfig, ids: torch.Tensor,
                     doc_ids: torch.Tensor | None = None, memory: MemoryContext | None = None) -> torch.Tensor:
    """The old forward, from a legacy (unfused) state dict: separate q/k/v and w1/w2, float32 norms and RoPE,
    positions from the dense mask's row sums."""
    B, T = ids.shape
    H, dh, eps = cfg.n_heads, cfg.head_dim, cfg.norm_eps
    if doc_ids is None:
        mask, positions = None, torch.arange(T)
    else:
        mask = document_mask(doc_ids)[0]
        positions = mask.squeeze(1).sum(-1) - 1
    cos, sin = rope_tables(positions, dh, cfg.rope_base)
    cos, sin = (c.unsqueeze(-3) if c.dim() == 3 else c[None, None] for c in (cos, sin))

    def lin(name: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, state[name])

    def plus(t, site, layer, x):
        d = memory.delta(site, layer, x) if memory is not None else None
        return t if d is None else t + d

    x = F.embedding(ids, state["tok_emb.weight"])
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        h = _ref_norm(x, state[p + "attn_norm.weight"], eps)
        q, k, v = (plus(lin(p + f"attn.{n}_proj.weight", h), f"attn_{n}", i, h) for n in "qkv")
        q, k = _ref_norm(q, state[p + "attn.q_norm.weight"], eps), _ref_norm(k, state[p + "attn.k_norm.weight"], eps)
        q, k, v = (t.view(B, T, H, dh).transpose(1, 2) for t in (q, k, v))
        q_pre_rope = q
        q, k = _ref_rope(q, cos, sin), _ref_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True) if mask is None else \
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = plus(out, "attn_kv", i, q_pre_rope)
        concat = out.transpose(1, 2).reshape(B, T, H * dh)
        x = x + plus(lin(p + "attn.o_proj.weight", concat), "attn_o", i, concat)
        h = _ref_norm(x, state[p + "ffn_norm.weight"], eps)
        gate = plus(lin(p + "ffn.w1.weight", h), "ffn_gate", i, h)
        up = plus(lin(p + "ffn.w2.weight", h), "ffn_up", i, h)
        hidden = F.silu(gate) * up
        x = x + plus(plus(lin(p + "ffn.w3.weight", hidden), "ffn_down", i, hidden), "ffn", i, h)
    return F.linear(_ref_norm(x, state["norm.weight"], eps), state["lm_head.weight"])


def legacy_state_dict(m: OpenLMAnchor) -> dict[str, torch.Tensor]:
    """The state dict as the unfused anchor wrote it (q_proj/k_proj/v_proj, w1/w2)."""
    out = {}
    for key, value in m.state_dict().items():
        if key.endswith("attn.qkv.weight"):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                out[key.replace("qkv", name)] = part.clone()
        elif key.endswith("ffn.w12.weight"):
            for name, part in zip(("w1", "w2"), value.chunk(2)):
                out[key.replace("w12", name)] = part.clone()
        else:
            out[key] = value.clone()
    return out


def test_fused_anchor_matches_unfused_reference() -> None:
    m = small(tied_embeddings=False)
    ids = tokens(2, 12)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 3 + [1] * 6 + [-1] * 3])
    state = legacy_state_dict(m)
    for docs in (None, doc_ids):
        torch.testing.assert_close(m(ids, doc_ids=docs), reference_logits(state, m.config, ids, docs),
                                   rtol=1e-5, atol=1e-5)


class _UnfusedShape(nn.Module):
    """The module tree of the unfused anchor (construction order and init rule), for the init comparison."""

    def __init__(self, c: OpenLMConfig):
        super().__init__()
        inner = c.n_heads * c.head_dim
        lin = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList()
        for _ in range(c.n_layers):
            attn = nn.ModuleDict(dict(q_proj=lin(c.d_model, inner), k_proj=lin(c.d_model, inner),
                                      v_proj=lin(c.d_model, inner), o_proj=lin(inner, c.d_model)))
            ffn = nn.ModuleDict(dict(w1=lin(c.d_model, c.ffn_dim), w2=lin(c.d_model, c.ffn_dim),
                                     w3=lin(c.ffn_dim, c.d_model)))
            self.blocks.append(nn.ModuleDict(dict(attn=attn, ffn=ffn)))
        self.lm_head = lin(c.d_model, c.vocab_size)
        self.lm_head.weight = self.tok_emb.weight
        out_std = c.init_std / math.sqrt(2 * c.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_out = name.endswith("attn.o_proj") or name.endswith("ffn.w3")
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else c.init_std)


def test_init_is_unchanged_by_the_fusion() -> None:
    """A seed draws the same weights as the separate modules did (q, k, v then o; gate, up then down)."""
    m = small()
    torch.manual_seed(0)
    old = _UnfusedShape(m.config)
    legacy = legacy_state_dict(m)
    for name, param in old.named_parameters():
        torch.testing.assert_close(legacy[name], param.detach(), rtol=0, atol=0, msg=name)


def test_legacy_model_files_load_into_the_fused_anchor(tmp_path) -> None:
    m = small()
    path = tmp_path / "anchor.safetensors"
    legacy = legacy_state_dict(m)
    legacy.pop("lm_head.weight")   # tied: stored once, as safetensors' save_model does
    save_file(legacy, str(path))
    fresh = small()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_model(fresh, str(path))
    ids = tokens(2, 9)
    torch.testing.assert_close(fresh(ids), m(ids), rtol=0, atol=0)
    # a Lightning checkpoint's nested keys (model.anchor.*) convert the same way
    nested = nn.ModuleDict({"anchor": small()})
    nested.load_state_dict({f"anchor.{k}": v for k, v in legacy_state_dict(m).items()})
    torch.testing.assert_close(nested["anchor"](ids), m(ids), rtol=0, atol=0)


def test_every_memory_type_matches_the_reference() -> None:
    """Deltas of every built-in memory type (LoRA on attn_q/k/v and ffn_gate/up among them) land where they did
    before the fusion of q/k/v and gate/up."""
    from hmlm.bank.layout import BankLayout
    from hmlm.bank.stores import BlockStore
    from hmlm.memories.ffn import FFNMemory
    from hmlm.memories.kv import KVMemory
    from hmlm.memories.lora import LoRAFFNMemory, LoRAQKMemory, LoRAVOMemory

    m = small()
    ids = tokens(2, 10)
    for mem_type in (FFNMemory(), KVMemory(), LoRAQKMemory(), LoRAVOMemory(), LoRAFFNMemory()):
        layout = BankLayout(memory=mem_type, shape=m.shape, sizes=(4, 2), branching=2, layers=(0, 2))
        store = BlockStore(layout, generic=False, seed=3)
        for key, name, t in store.iter_blocks():
            t.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))  # non-zero B: a visible delta
        paths = torch.tensor([[0, 1], [1, 3]])
        ctx = MemoryContext(mem_type, store.fetch(paths), layout.layers)
        got = m(ids, memory=ctx)
        want = reference_logits(legacy_state_dict(m), m.config, ids, memory=ctx)
        assert not torch.allclose(got, m(ids), atol=1e-4), type(mem_type).__name__
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_stays_close_to_float32() -> None:
    m = small()
    ids = tokens(2, 16)
    doc_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    ref = m(ids, doc_ids=doc_ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(ids, doc_ids=doc_ids)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-1, 3), min_size=1, max_size=24))
def test_document_positions_equal_the_mask_row_sums(doc_list: list[int]) -> None:
    """Any doc ids (padding, repeated or interleaved documents) give the positions the dense mask implies."""
    doc_ids = torch.tensor([doc_list, doc_list[::-1]])
    mask = document_mask(doc_ids)[0]
    torch.testing.assert_close(document_positions(doc_ids), mask.squeeze(1).sum(-1) - 1)


# ---------------------------------------------------------------- the fused chunked cross-entropy

@pytest.mark.parametrize("chunk_rows", [7, 1000])
def test_linear_cross_entropy_matches_plain_cross_entropy(monkeypatch, chunk_rows: int) -> None:
    import hmlm.loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", {"cpu": chunk_rows * VOCAB})
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 25, 16, generator=g).requires_grad_()
    w = torch.randn(VOCAB, 16, generator=g).requires_grad_()
    labels = torch.randint(0, VOCAB, (4, 25), generator=g)
    labels[:, -3:] = -100
    weights = token_weights(labels)
    got = linear_cross_entropy(h.flatten(0, 1), w, labels.flatten(), weights.flatten())
    got.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = F.cross_entropy((h @ w.t()).flatten(0, 1), labels.flatten(), ignore_index=-100)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():   # evaluation path: no gradients computed, same value
        torch.testing.assert_close(linear_cross_entropy(h.flatten(0, 1), w, labels.flatten(), weights.flatten()),
                                   want, rtol=1e-6, atol=1e-6)


def test_token_weights_give_the_mean_of_group_means() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 9, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (6, 9), generator=g)
    labels[0, :5] = -100
    labels[4, :2] = -100
    want = torch.stack([F.cross_entropy(lg.flatten(0, 1), lb.flatten(), ignore_index=-100)
                        for lg, lb in zip(logits.chunk(3), labels.chunk(3))]).mean()
    torch.testing.assert_close(weighted_cross_entropy(logits, labels, token_weights(labels, groups=3)), want)
    total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(weighted_cross_entropy(logits, labels, (labels != -100).float()), total)


def test_lm_nll_fused_equals_logits_path_and_bf16_is_close() -> None:
    m = small()
    ids, labels = tokens(3, 14), tokens(3, 14, seed=5)
    weights = token_weights(labels)
    doc_ids = torch.tensor([[0] * 7 + [1] * 7] * 3)
    fused = lm_nll(m, ids, labels, weights, doc_ids=doc_ids)
    plain = lm_nll(m, ids, labels, weights, doc_ids=doc_ids, fused=False)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    g_fused = torch.autograd.grad(fused, list(m.parameters()))
    g_plain = torch.autograd.grad(plain, list(m.parameters()))
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = lm_nll(m, ids, labels, weights, doc_ids=doc_ids)
    assert abs(low.item() - plain.item()) < 0.02 * plain.item()

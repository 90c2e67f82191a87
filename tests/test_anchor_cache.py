"""The anchors' key/value cache (`new_cache()`, `forward(..., cache=)`): a context computed once and continued, for
one row or repeated for several, gives the logits of the full forward, with and without memory (openlm with FFN and
KV memories; the hf anchor on tiny random Llama and Qwen2). Used by the eval adapter to score multiple choice."""
from __future__ import annotations

import pytest
import torch

from hmlm import registry
from hmlm.anchors.openlm import OpenLMAnchor, OpenLMConfig
from hmlm.bank.layout import BankLayout
from hmlm.bank.stores import DeviceStore
from hmlm.model import MemoryLM
from hmlm.protocols import MemoryContext

K, VOCAB = 2, 61


def _openlm(seed: int = 0) -> OpenLMAnchor:
    torch.manual_seed(seed)
    return OpenLMAnchor(OpenLMConfig(n_layers=2, d_model=32, n_heads=2, head_dim=16, ffn_dim=48,
                                     vocab_size=VOCAB)).eval()


def _hf(model_type: str):
    from test_hf_anchor import tiny_anchor

    return tiny_anchor(model_type, seed=0)


def _with_memory(anchor, kind: str) -> MemoryLM:
    layout = BankLayout(registry.get("memories", kind)(), anchor.shape, (3, 2), K, (0, 1))
    model = MemoryLM(anchor, layout, DeviceStore(layout, generic=False, seed=0))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():   # give the zero-initialised tensors values, so that the memory acts
        for blocks in model.store.tensors.values():
            for t in blocks.values():
                t.normal_(std=0.3, generator=g)
    return model


ANCHORS = {"openlm": _openlm, "hf-llama": lambda: _hf("llama"), "hf-qwen2": lambda: _hf("qwen2")}


def _memory(model: MemoryLM | None, rows: int) -> MemoryContext | None:
    if model is None:
        return None
    return model.memory_context(torch.tensor([[1, 2]] * rows), "fetched")


@pytest.mark.parametrize("name,kind", [("openlm", None), ("openlm", "ffn"), ("openlm", "kv"), ("hf-llama", None),
                                       ("hf-qwen2", "ffn")])
@torch.no_grad()
def test_cached_prefix_then_continuations_equal_the_full_forward(name, kind):
    anchor = ANCHORS[name]()
    model = _with_memory(anchor, kind) if kind else None
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, VOCAB, (1, 7), generator=g)
    conts = torch.randint(0, VOCAB, (3, 4), generator=g)
    lengths = [4, 2, 3]   # rows are right-padded: padding after a row's tokens cannot change them
    cache = anchor.new_cache()
    head = anchor(prefix, memory=_memory(model, 1), cache=cache)
    assert cache.length == 7
    tails = anchor(conts, memory=_memory(model, 3), cache=cache.repeat(3))
    assert cache.length == 7   # repeating never extends the shared cache
    for row, n in enumerate(lengths):
        full = anchor(torch.cat([prefix[0], conts[row, :n]])[None], memory=_memory(model, 1))
        torch.testing.assert_close(head[0], full[0, :7], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tails[row, :n], full[0, 7:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["openlm", "hf-llama"])
@torch.no_grad()
def test_token_by_token_decoding_with_the_cache_equals_the_full_forward(name):
    anchor = ANCHORS[name]()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    full = anchor(ids)
    cache = anchor.new_cache()
    steps = [anchor(ids[:, :5], cache=cache)] + [anchor(ids[:, t:t + 1], cache=cache) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_cached_packed_documents_continue_as_one_forward():
    # document ids through the cache (what left-padded decoding uses): the logits of a packed sequence computed in
    # two cached pieces equal one forward over the whole of it, padding (-1) included
    anchor = _openlm()
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, VOCAB, (2, 8), generator=g)
    doc_ids = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, -1, 2]])
    whole = anchor(ids, doc_ids=doc_ids)
    cache = anchor.new_cache()
    first = anchor(ids[:, :5], doc_ids=doc_ids[:, :5], cache=cache)
    rest = anchor(ids[:, 5:], doc_ids=doc_ids[:, 5:], cache=cache)
    real = doc_ids >= 0
    torch.testing.assert_close(torch.cat([first, rest], 1)[real], whole[real], rtol=1e-5, atol=1e-5)
    assert cache.doc_ids.tolist() == doc_ids.tolist()
    # tokens without ids continue each row's last document
    more = anchor(ids[:, :1], cache=cache)
    assert cache.doc_ids[:, -1].tolist() == [1, 2] and more.shape == (2, 1, VOCAB)
    with pytest.raises(ValueError, match="doc_ids shape"):
        anchor(ids[:, :2], doc_ids=doc_ids[:, :3], cache=cache)


def test_cache_refuses_repeating_several_rows():
    anchor = _openlm()
    ids = torch.zeros(2, 4, dtype=torch.long)
    cache = anchor.new_cache()
    anchor(ids, cache=cache)
    with pytest.raises(ValueError, match="one row"):
        cache.repeat(3)

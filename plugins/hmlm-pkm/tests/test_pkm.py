"""hmlm-pkm passes hmlm's conformance kit, takes its options from a recipe mapping and finds the exact top-k."""
from __future__ import annotations

import pytest
import torch

from hmlm.config import RecipeError
from hmlm.protocols import AnchorShape
from hmlm.testing import MemoryTypeTests, make_plugin
from hmlm_pkm import ProductKeyMemory


class TestPKM(MemoryTypeTests):
    plugin = "pkm"                       # through the installed entry point, as a recipe would name it
    options = {"subkeys": 4, "knn": 2}


class TestPKMDefaults(MemoryTypeTests):
    plugin = ProductKeyMemory


def test_options_are_validated_with_the_key_named():
    with pytest.raises(RecipeError, match=r"unknown key `memory.options.topk`; known keys under `memory.options`: "
                                          r"subkeys, knn, init_std"):
        make_plugin("memories", "pkm", None, options={"topk": 3})
    with pytest.raises(RecipeError, match=r"key `memory.options`: knn must be in \[1, subkeys=4\], got 9"):
        make_plugin("memories", "pkm", None, options={"knn": 9})
    assert make_plugin("memories", "pkm", None, options={"knn": 3}).options.knn == 3


def test_product_key_read_is_the_exact_top_k_of_all_products():
    mem = ProductKeyMemory(ProductKeyMemory.Options(subkeys=5, knn=3))
    shape = AnchorShape(n_layers=1, d_model=8, n_heads=1, head_dim=8, ffn_dim=16)
    g = torch.Generator().manual_seed(0)
    spec = mem.block_spec(shape, 2, 1)
    fetched = {k: torch.randn(1, *s.shape, generator=g) for k, s in spec.items()}
    x = torch.randn(1, 6, 8, generator=g)
    # brute force: score all 25 keys of each head, softmax over the best 3, weighted sum of their values
    k1, k2, vals = fetched["keys1"][0, 0], fetched["keys2"][0, 0], fetched["values"][0, 0]
    want = torch.zeros(6, 8)
    for h in range(2):
        scores = (x[0, :, None, :4] * k1[h][None]).sum(-1)[:, :, None] + (x[0, :, None, 4:] * k2[h][None]).sum(-1)[:, None]
        best, idx = scores.flatten(1).topk(3, dim=-1)
        want += (torch.softmax(best, -1)[..., None] * vals[h][idx]).sum(1)
    slot0 = {k: t[:, 0] for k, t in fetched.items()}   # apply gets one layer slot's tensors (plugin API 2)
    torch.testing.assert_close(mem.apply("ffn", 0, x, slot0)[0], want, rtol=1e-5, atol=1e-5)

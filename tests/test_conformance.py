"""hmlm's own plugins pass the conformance kit (hmlm.testing) that third-party plugins are tested with."""
from __future__ import annotations

import pytest

from hmlm.testing import AnchorTests, EmbedderTests, MemoryTypeTests, RouterTests, StoreTests
from hmlm.testing.common import TINY_ANCHOR


class TestFFN(MemoryTypeTests):
    plugin = "ffn"


class TestKV(MemoryTypeTests):
    plugin = "kv"


class TestLoRAQK(MemoryTypeTests):
    plugin = "lora-qk"


class TestLoRAVO(MemoryTypeTests):
    plugin = "lora-vo"


class TestLoRAFFN(MemoryTypeTests):
    plugin = "lora-ffn"


class TestHKMeans(RouterTests):
    plugin = "hkmeans"


class TestTieredStoreHost(StoreTests):
    plugin = "tiered"
    memory = {"tiers": "host", "optim_state": "bf16"}


class TestTieredStoreDisk(StoreTests):
    plugin = "tiered"
    memory = {"tiers": "disk"}


class TestDeviceStore(StoreTests):
    plugin = "device"


class TestHostStore(StoreTests):
    plugin = "host"
    memory = {"optim_state": "factored"}


class TestOpenLM(AnchorTests):
    plugin = "openlm"
    options = TINY_ANCHOR


class TestHF(AnchorTests):
    plugin = "hf"
    options = {"model_type": "llama", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                 "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16}}


class TestHashing(EmbedderTests):
    plugin = "hashing"
    config = {"name": "hashing", "dim": 64}


def test_kit_catches_a_memory_that_leaks_across_samples():
    """The kit must be able to fail: a memory mixing the batch's samples is caught by the isolation check."""
    from hmlm.memories.ffn import FFNMemory
    from hmlm.testing.memories import check_per_sample_isolation

    class Leaky(FFNMemory):
        def apply(self, site, slot, x, fetched):
            out = super().apply(site, slot, x, fetched)
            return out + out.mean(0, keepdim=True)   # every sample sees the batch mean

    with pytest.raises(AssertionError, match="changed when only sample"):
        check_per_sample_isolation(Leaky())


def test_kit_catches_a_router_with_bad_child_numbering():
    from hmlm.routers.hkmeans import HierarchicalKMeans
    from hmlm.testing.routers import check_router

    class Shuffled(HierarchicalKMeans):
        def route(self, embeddings, *, blocked=()):
            paths = super().route(embeddings, blocked=blocked)
            paths[:, 1] = (paths[:, 1] + self.branching) % self.branching ** 2   # children under the wrong parent
            return paths

    with pytest.raises(AssertionError, match="is not a child of"):
        check_router(lambda seed: Shuffled(3, 3, iters=5, batch_size=256, seed=seed))

"""`hmlm.testing`: the conformance kit a plugin's tests build on (hmlm's built-ins pass it in hmlm's own tests).

Every check is a plain function raising AssertionError with a message that says which guarantee of
`hmlm.protocols` failed; each kind also has a pytest-ready mix-in class whose `test_*` methods run them. A plugin's
test module subclasses the mix-in under a name pytest collects and says which plugin to test:

    from hmlm.testing import MemoryTypeTests, RouterTests

    class TestPKM(MemoryTypeTests):
        plugin = "pkm"                      # the registry name (the package must be installed), or the class
        options = {"subkeys": 4, "knn": 2}  # what a recipe would put under memory.options

    class TestMyRouter(RouterTests):
        plugin = "my-router"

Everything runs on the CPU in seconds with tiny shapes. Nothing here reads hmlm's internals on the author's behalf:
the kit builds a 2-layer `openlm` anchor and a `DeviceStore` bank the way `hmlm fit` does.

Checks (see each module for the details):
    memory types  block_spec linear along rank axes; zero effect at init (fetched and generic); gradients reach only
                  fetched blocks and an update changes only them; per-sample isolation; batched == per-sample;
                  options from a recipe mapping
    routers       valid paths (shape, dtype, ranges, children p*k+j); determinism (same seed -> same tree);
                  save/load round trip of `<index>/tree.safetensors`; `blocked` with 0-based levels honoured;
                  bad `blocked` entries and fully blocked nodes raise ValueError; name and JSON fit_stats
    stores        fetch shapes and generic rows; fetch/update round trip (fetched rows change, untouched rows
                  bit-identical); fetched_grads lists exactly the fetched rows; read_rows/write_rows; state_dict,
                  save/load and save_checkpoint/load_checkpoint round trips (the next update identical)
    anchors       forward shape; every supported memory site called at every memory layer with the documented input
                  shape; zero deltas == no memory; a non-zero delta changes the logits; layers without memory skipped
    embedders     float32 [N, dim] unit rows; deterministic and independent of batching; identity() JSON
"""
from __future__ import annotations

from .anchors import AnchorTests, check_anchor
from .common import make_plugin
from .embedders import EmbedderTests, check_embedder
from .memories import MemoryTypeTests, assert_per_sample_isolation, check_memory_type, tiny_memory_model
from .routers import RouterTests, check_router
from .stores import StoreTests, check_store

__all__ = ["AnchorTests", "EmbedderTests", "MemoryTypeTests", "RouterTests", "StoreTests", "assert_per_sample_isolation",
           "check_anchor", "check_embedder", "check_memory_type", "check_router", "check_store", "make_plugin",
           "tiny_memory_model"]

"""Conformance checks for anchors (hmlm.protocols.Anchor / AnchorPlugin)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..protocols import MEMORY_SITES, Anchor, AnchorShape, MemoryContext


def site_shapes(shape: AnchorShape, b: int, t: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """site -> (input shape, output shape) as documented by hmlm.protocols.MEMORY_SITES."""
    d, a, f, h, dh = shape.d_model, shape.attn_dim, shape.ffn_dim, shape.n_heads, shape.head_dim
    return {"ffn": ((b, t, d), (b, t, d)), "attn_q": ((b, t, d), (b, t, a)), "attn_k": ((b, t, d), (b, t, a)),
            "attn_v": ((b, t, d), (b, t, a)), "attn_o": ((b, t, a), (b, t, d)), "attn_kv": ((b, h, t, dh), (b, h, t, dh)),
            "ffn_gate": ((b, t, d), (b, t, f)), "ffn_up": ((b, t, d), (b, t, f)), "ffn_down": ((b, t, f), (b, t, d))}


class ProbeMemory:
    """A memory type that records every call and returns a constant delta of the site's output shape."""

    def __init__(self, sites: tuple[str, ...], shape: AnchorShape, value: float = 0.0):
        self.sites, self.shape, self.value = tuple(sites), shape, value
        self.calls: list[tuple[str, int, tuple[int, ...]]] = []

    def block_spec(self, shape, r, n_layers):  # not used: the probe is handed to the anchor directly
        return {}

    def init_block(self, tensors, generator):
        return None

    def apply(self, site: str, slot: int, x: torch.Tensor, fetched: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self.calls.append((site, slot, tuple(x.shape)))
        out_shape = site_shapes(self.shape, *_bt(site, x))[site][1]
        return torch.full(out_shape, self.value, dtype=x.dtype, device=x.device)


def _bt(site: str, x: torch.Tensor) -> tuple[int, int]:
    return (x.shape[0], x.shape[2]) if site == "attn_kv" else (x.shape[0], x.shape[1])


def anchor_sites(anchor: Any) -> tuple[str, ...]:
    return tuple(getattr(anchor, "sites", MEMORY_SITES))


def check_anchor(make: Callable[[], Any], b: int = 2, t: int = 7) -> None:
    """`make()` returns a tiny anchor (an nn.Module) on the CPU. Runs every anchor check."""
    anchor = make().eval()
    assert isinstance(anchor, Anchor) and isinstance(anchor, torch.nn.Module), "an anchor is an nn.Module with `shape`"
    shape = anchor.shape
    assert isinstance(shape, AnchorShape), "anchor.shape must be an hmlm.protocols.AnchorShape"
    vocab = anchor.config.vocab_size
    ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = anchor(ids)
        assert tuple(base.shape) == (b, t, vocab), f"logits shape {tuple(base.shape)}, expected {(b, t, vocab)}"
        sites = anchor_sites(anchor)
        assert "ffn" in sites and set(sites) <= set(MEMORY_SITES), f"sites {sites}: need `ffn`, within MEMORY_SITES"
        layers = tuple(range(shape.n_layers))
        expected = site_shapes(shape, b, t)
        for site in sites:
            probe = ProbeMemory((site,), shape)
            out = anchor(ids, memory=MemoryContext(probe, {}, layers))
            called = sorted({slot for s, slot, _ in probe.calls})
            assert called == list(range(len(layers))), f"site {site}: called for layer slots {called}, expected all"
            for s, slot, in_shape in probe.calls:
                assert in_shape == expected[site][0], \
                    f"site {site}: input shape {in_shape}, documented {expected[site][0]} (hmlm.protocols.MEMORY_SITES)"
            torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"site {site}: zero deltas changed the logits\n{m}")
            moved = anchor(ids, memory=MemoryContext(ProbeMemory((site,), shape, 0.5), {}, layers))
            assert not torch.allclose(moved, base), f"site {site}: a non-zero delta did not change the logits"
        probe = ProbeMemory(("ffn",), shape)
        anchor(ids, memory=MemoryContext(probe, {}, (shape.n_layers - 1,)))
        assert {slot for _, slot, _ in probe.calls} == {0} and len(probe.calls) == 1, \
            "a memory serving only the last layer must be asked once, for slot 0 (MemoryContext maps layers to slots)"


class AnchorTests:
    """pytest mix-in: subclass as `class TestMine(AnchorTests)` and set `plugin` and `options` (a tiny model)."""

    plugin: Any = None                        # registry name of the anchor, or its class
    options: Mapping[str, Any] | None = None  # as under `anchor.options` in a recipe: the architecture of a tiny model
    config: Mapping[str, Any] = {}            # the core's anchor.* keys (vocab_size, ...), rarely needed
    vocab_size = 64

    def make(self):
        from ..config import AnchorConfig
        from .common import make_plugin

        assert self.plugin is not None, "set `plugin` to the anchor's registry name or class"
        cfg = AnchorConfig(**dict(self.config))
        torch.manual_seed(0)
        return make_plugin("anchors", self.plugin, "from_config", cfg, vocab_size=self.vocab_size,
                           options=self.options)

    def test_anchor_conformance(self):
        check_anchor(self.make)

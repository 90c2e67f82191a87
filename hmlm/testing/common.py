"""What every kind's checks share: resolving the plugin under test and the tiny anchor they build on."""
from __future__ import annotations

from typing import Any, Mapping

from .. import registry
from ..plugin_config import SLOT_BY_GROUP, call_with_options

# the openlm anchor's options (`anchor.options`) of a 2-layer anchor small enough for every check to run in well under
# a second on a CPU
TINY_ANCHOR = {"preset": "tiny", "n_layers": 2, "d_model": 32, "n_heads": 2, "head_dim": 16, "ffn_dim": 64}
TINY_VOCAB = 64


def plugin_class(group: str, plugin: Any) -> Any:
    """A registry name (resolved through the installed entry points) or the class itself."""
    return registry.get(group, plugin) if isinstance(plugin, str) else plugin


def make_plugin(group: str, plugin: Any, factory: str | None, *args: Any, options: Mapping[str, Any] | None = None,
                **kwargs: Any) -> Any:
    """Construct a plugin the way hmlm does from a recipe: `options` is the recipe's mapping, validated against the
    plugin's `Options` and passed as `options=` (a RecipeError names the key, as for a recipe)."""
    key = SLOT_BY_GROUP[group].options_key
    return call_with_options(plugin_class(group, plugin), factory, options, *args, source="hmlm.testing", key=key,
                             **kwargs)


def tiny_anchor(*, vocab_size: int = TINY_VOCAB, seed: int = 0, **overrides: Any):
    import torch

    from ..config import AnchorConfig

    torch.manual_seed(seed)
    return make_plugin("anchors", "openlm", "from_config", AnchorConfig(), vocab_size=vocab_size,
                       options={**TINY_ANCHOR, **overrides})

"""Plugin-owned options, and resolving a recipe's plugins when the recipe is loaded.

A plugin class may declare its own options as a dataclass in the class attribute `Options`:

    class ProductKeyMemory:
        @dataclass
        class Options:
            subkeys: int = 8
            knn: int = 4

A recipe sets them in an `options:` mapping beside the plugin's name (`memory.options.knn: 8`, or on the command
line `memory.options.knn=8`). The mapping is validated with OmegaConf against the dataclass, so an unknown key or a
wrong type fails with the same one-line error as the core schema, naming the recipe file and the full key. A
`__post_init__` that raises ValueError is reported the same way (range checks). The plugin receives the typed
instance as the keyword argument `options=` of its constructor (memories) or factory (`from_config` /
`from_recipe`); a plugin without `Options` is constructed exactly as before and refuses a non-empty `options`.

`check_recipe_plugins` runs when a recipe is loaded (also for `hmlm fit --dry-run`), before any indexing: every
plugin name is resolved and its module imported, and every `options` mapping is checked.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import registry

if TYPE_CHECKING:
    from .config import Recipe


@dataclasses.dataclass(frozen=True)
class PluginSlot:
    """Where a recipe names a plugin of one group, and where that plugin's options live."""

    name_key: str      # dotted recipe key holding the plugin's name
    group: str         # registry group
    options_key: str   # dotted recipe key holding its options mapping


SLOTS = (
    PluginSlot("anchor.name", "anchors", "anchor.options"),
    PluginSlot("memory.type", "memories", "memory.options"),
    PluginSlot("memory.store", "stores", "memory.store_options"),
    PluginSlot("index.router.name", "routers", "index.router.options"),
    PluginSlot("index.embedder.name", "embedders", "index.embedder.options"),
)
SLOT_BY_GROUP = {s.group: s for s in SLOTS}


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def options_class(plugin: Any) -> type | None:
    cls = getattr(plugin, "Options", None)
    if cls is not None and not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise registry.PluginError(f"plugin {plugin!r}: `Options` must be a dataclass (it is {cls!r})")
    return cls


def parse_options(plugin: Any, raw: Mapping[str, Any] | None, *, source: str, key: str) -> Any:
    """The plugin's typed options from a recipe's mapping (None for a plugin that declares none)."""
    from .config import RecipeError  # local: config imports this module

    raw = dict(raw or {})
    cls = options_class(plugin)
    if cls is None:
        if raw:
            raise RecipeError(f"{source}: key `{key}`: plugin {getattr(plugin, '__name__', plugin)!r} takes no "
                              f"options, got {', '.join(sorted(raw))}")
        return None
    known = ", ".join(f.name for f in dataclasses.fields(cls))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(raw))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        sub = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        if type(exc).__name__ == "ConfigKeyError" or "not in" in msg:
            raise RecipeError(f"{source}: unknown key `{key}.{sub}`; known keys under `{key}`: {known}") from None
        if type(exc).__name__ == "MissingMandatoryValue":
            raise RecipeError(f"{source}: key `{key}.{sub}` is missing: set it in the recipe or on the command line "
                              f"({key}.{sub}=...)") from None
        cause = exc.__cause__ if isinstance(exc.__cause__, ValueError) else None
        if cause is not None:  # raised by the dataclass's __post_init__ while OmegaConf built the instance
            raise RecipeError(f"{source}: key `{key}`: {cause}") from None
        raise RecipeError(f"{source}: key `{key}.{sub}`: {msg}") from None
    except ValueError as exc:  # __post_init__ range checks
        raise RecipeError(f"{source}: key `{key}`: {exc}") from None


def check_recipe_plugins(recipe: Recipe, source: str) -> None:
    """Resolve and import every plugin the recipe names and validate its options (RecipeError naming file and key)."""
    from .config import RecipeError

    for slot in SLOTS:
        name = _get(recipe, slot.name_key)
        known = registry.names(slot.group)
        if name not in known:
            raise RecipeError(f"{source}: key `{slot.name_key}`: unknown {slot.group} plugin {name!r}; installed: "
                              f"{', '.join(known) or '(none)'} (`hmlm plugins` lists them with their packages)")
        try:
            plugin = registry.get(slot.group, name)
        except registry.PluginError as exc:
            raise RecipeError(f"{source}: key `{slot.name_key}`: {exc}") from None
        parse_options(plugin, _get(recipe, slot.options_key), source=source, key=slot.options_key)


def create(group: str, recipe: Recipe, factory: str | None, *args: Any, **kwargs: Any) -> Any:
    """Build the recipe's plugin of `group`: `Plugin.<factory>(*args, **kwargs)` (or `Plugin(...)` when factory is
    None), with `options=<typed options>` added for a plugin that declares `Options`."""
    slot = SLOT_BY_GROUP[group]
    plugin = registry.get(group, _get(recipe, slot.name_key))
    return call_with_options(plugin, factory, _get(recipe, slot.options_key), *args, source="recipe",
                             key=slot.options_key, **kwargs)


def call_with_options(plugin: Any, factory: str | None, raw: Mapping[str, Any] | None, *args: Any, source: str,
                      key: str, **kwargs: Any) -> Any:
    options = parse_options(plugin, raw, source=source, key=key)
    fn: Callable[..., Any] = plugin if factory is None else getattr(plugin, factory)
    return fn(*args, **kwargs) if options is None else fn(*args, options=options, **kwargs)


def recipe_plugins(recipe: Recipe) -> list[dict[str, str]]:
    """The plugins a recipe uses and the distributions that provide them (recorded in model.json)."""
    return [{"key": s.name_key, "group": s.group, "name": _get(recipe, s.name_key),
             **registry.provenance(s.group, _get(recipe, s.name_key))} for s in SLOTS]


def check_recorded_plugins(recorded: Any, source: str) -> None:
    """Before a saved model's recipe is read: every plugin it was trained with is installed, else a message saying
    which distribution (and version) to install. An older model.json without the record passes."""
    if not isinstance(recorded, list):
        return
    for rec in recorded:
        if not isinstance(rec, dict) or not {"group", "name", "dist"} <= rec.keys():
            continue
        if rec["name"] not in registry.names(rec["group"]):
            version = rec.get("version") or ""
            pin = f"=={version}" if version and version != "?" else ""
            raise registry.PluginError(
                f"{source}: this model was trained with the {rec['group']} plugin {rec['name']!r} (`{rec.get('key')}`)"
                f" from the distribution {rec['dist']!r} {version}, which is not installed here; install it "
                f"(pip install '{rec['dist']}{pin}') and try again")

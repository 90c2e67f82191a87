"""Plugin registry: anchors, memories, routers, embedders and stores, found through entry points.

A plugin is a class registered by an installed distribution under one of the entry-point groups
`hmlm.anchors`, `hmlm.memories`, `hmlm.routers`, `hmlm.embedders`, `hmlm.stores`. hmlm registers
its own built-ins the same way (see pyproject.toml), so a third-party package is a peer, not a patch:

    [project.entry-points."hmlm.memories"]
    pkm = "my_pkg.pkm:ProductKeyMemory"

Security: plugins load ONLY from installed entry points. A recipe names a plugin by its short name
("ffn"); it can never name an import string ("os:system"), so reading a recipe imports nothing that
was not deliberately installed.

Behaviour:
- Lazy: listing names reads distribution metadata only; `get()` imports the one plugin asked for.
- Two different distributions registering one name in one group is an error naming both; it is raised
  by `get()` of that name and shown by `describe()`. A built-in name (registered by hmlm itself) cannot be
  shadowed: hmlm's own plugin keeps the name and the other registration is shown as failed by `describe()`
  (`hmlm plugins` exits 1), so a third-party package can neither replace nor disable `ffn`. The same distribution seen twice (an editable
  install visible through site-packages and an `.egg-info` in the working directory) is one
  distribution: the copy first on sys.path wins, as it does for imports.
- A plugin that fails to import raises PluginError from `get()` (chained to the original error) and
  is reported by `describe()`; the other plugins are unaffected.
- A plugin may declare `hmlm_plugin_api = N` (hmlm.protocols.PLUGIN_API); one written for another API
  version is refused by `get()` with a message naming its distribution. Undeclared means the current API.
"""
from __future__ import annotations

import importlib.metadata as md
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:  # rich is only needed for the CLI listing, so get() never imports it
    from rich.console import Console
    from rich.table import Table

PREFIX = "hmlm."
BUILTIN_DIST = "hmlm"  # the distribution whose plugins are the built-ins (pyproject.toml of this repository)
GROUPS = ("anchors", "memories", "routers", "embedders", "stores")

_HINT = "(installed plugins: run `hmlm plugins`)"


class PluginError(LookupError):
    """A plugin name is unknown, ambiguous (collision) or its module fails to import."""


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin, as shown by `hmlm plugins`. `error` is None for a healthy plugin."""

    group: str  # short group name, e.g. "memories"
    name: str
    value: str  # the entry point's target, "module:attr"
    dist: str
    version: str
    error: str | None = None


@dataclass(frozen=True)
class _Entry:
    group: str
    name: str
    dist: str
    version: str
    ep: md.EntryPoint

    @property
    def value(self) -> str:
        return self.ep.value


# group -> name -> entries from distinct distributions (more than one = collision)
_index: dict[str, dict[str, list[_Entry]]] | None = None
# distributions whose metadata could not be read: (dist label, error); shown by describe()
_unreadable: list[tuple[str, str]] = []
_loaded: dict[tuple[str, str], Any] = {}
_lock = threading.RLock()


def _distributions() -> Iterable[md.Distribution]:
    # one seam so tests can scope discovery to a folder; everything else uses the real environment
    return md.distributions()


def _normalize_dist(name: str) -> str:
    # PEP 503 normalisation: "My_Pkg" and "my-pkg" are one distribution
    return re.sub(r"[-_.]+", "-", name).lower()


def _group(group: str) -> str:
    """Accept "memories" or "hmlm.memories"; return the short name or raise listing valid groups."""
    short = group[len(PREFIX):] if group.startswith(PREFIX) else group
    if short not in GROUPS:
        raise PluginError(f"unknown plugin group {group!r}; known: {', '.join(GROUPS)} "
                          f"(or with the {PREFIX!r} prefix)")
    return short


def _build_index() -> dict[str, dict[str, list[_Entry]]]:
    index: dict[str, dict[str, list[_Entry]]] = {g: {} for g in GROUPS}
    _unreadable.clear()
    seen_dists: set[str] = set()
    for dist in _distributions():
        # one broken dist-info (bad METADATA or entry_points.txt) must not hide every other plugin
        try:
            meta = dist.metadata
            raw_name = meta.get("Name") or "<unnamed distribution>"
            version = meta.get("Version") or "?"
            eps = list(dist.entry_points)
        except Exception as exc:
            label = str(getattr(dist, "_path", dist))
            _unreadable.append((label, f"unreadable distribution metadata: {type(exc).__name__}: {exc}"))
            continue
        key = _normalize_dist(raw_name)
        if key in seen_dists:  # a second copy of a distribution already seen earlier on sys.path
            continue
        seen_dists.add(key)
        for ep in eps:
            if not ep.group.startswith(PREFIX) or ep.group[len(PREFIX):] not in GROUPS:
                continue
            group = ep.group[len(PREFIX):]
            entries = index[group].setdefault(ep.name, [])
            if any(e.dist == raw_name for e in entries):  # duplicate line in one entry_points.txt
                continue
            entries.append(_Entry(group, ep.name, raw_name, version, ep))
    return index


def _get_index() -> dict[str, dict[str, list[_Entry]]]:
    global _index
    with _lock:
        if _index is None:
            _index = _build_index()
        return _index


def clear_cache() -> None:
    """Forget discovered entry points and loaded objects (tests, or after installing a plugin)."""
    global _index
    with _lock:
        _index = None
        _loaded.clear()


def _collision_message(entries: list[_Entry]) -> str:
    e0 = entries[0]
    who = " and ".join(f"{e.dist!r} {e.version} ({e.value})" for e in entries)
    return (f"{e0.group} plugin {e0.name!r} is registered by {len(entries)} distributions: {who}; "
            f"uninstall one of them")


def names(group: str) -> list[str]:
    """Sorted plugin names of `group` (short or full group name). Imports no plugin."""
    return sorted(_get_index()[_group(group)])


def _load(entry: _Entry) -> Any:
    try:
        return entry.ep.load()
    except Exception as exc:  # ImportError, SyntaxError, AttributeError, or whatever the module raises
        raise PluginError(
            f"cannot load {entry.group} plugin {entry.name!r} (entry point "
            f"{entry.name} = {entry.value}) from distribution {entry.dist!r} {entry.version}: "
            f"{type(exc).__name__}: {exc}") from exc


def get(group: str, name: str) -> Any:
    """The object (a class) registered as `name` in `group`; imports only that plugin's module."""
    short = _group(group)
    with _lock:
        key = (short, name)
        if key in _loaded:
            return _loaded[key]
        entries = _get_index()[short].get(name)
        if not entries:
            known = ", ".join(sorted(_get_index()[short])) or "(none)"
            raise PluginError(f"unknown {short} plugin {name!r}; known: {known} {_HINT}")
        builtin = _builtin_entry(entries)
        if len(entries) > 1 and builtin is None:
            raise PluginError(_collision_message(entries))
        entry = builtin or entries[0]
        obj = _load(entry)
        _check_api(entry, obj)
        _loaded[key] = obj
        return obj


def _builtin_entry(entries: list[_Entry]) -> _Entry | None:
    return next((e for e in entries if _normalize_dist(e.dist) == BUILTIN_DIST), None)


def _shadow_message(entry: _Entry) -> str:
    return (f"{entry.group} plugin {entry.name!r} of {entry.dist!r} {entry.version} ({entry.value}) uses the name of "
            f"an hmlm built-in, which cannot be replaced; hmlm keeps its own {entry.name!r}. Register the plugin "
            "under another name")


def _check_api(entry: _Entry, obj: Any) -> None:
    from .protocols import PLUGIN_API  # local: protocols imports torch, which listing plugins never needs

    declared = getattr(obj, "hmlm_plugin_api", PLUGIN_API)
    if declared != PLUGIN_API:
        raise PluginError(f"{entry.group} plugin {entry.name!r} from distribution {entry.dist!r} {entry.version} "
                          f"is written for hmlm plugin API {declared!r}; this hmlm provides API {PLUGIN_API}: "
                          f"install a version of {entry.dist!r} made for it")


def provenance(group: str, name: str) -> dict[str, str]:
    """Which installed distribution provides plugin `name` of `group` (what model.json records)."""
    short = _group(group)
    entries = _get_index()[short].get(name) or []
    entry = _builtin_entry(entries) or (entries[0] if len(entries) == 1 else None)
    if entry is None:
        get(short, name)  # raises the unknown-name or collision error
        raise AssertionError("unreachable")
    return {"dist": entry.dist, "version": entry.version}


def describe(load: bool = True) -> list[PluginInfo]:
    """Every registered plugin, grouped in GROUPS order then by name. Never raises.

    With load=True each plugin is imported and a failure is recorded in `error` as the original
    exception ("ModuleNotFoundError: No module named 'triton'"); with load=False
    nothing is imported and only collisions are reported. A colliding name yields one row per
    distribution, each carrying the collision message.
    """
    index = _get_index()
    infos: list[PluginInfo] = []
    for group, by_name in index.items():
        for name in sorted(by_name):
            entries = by_name[name]
            builtin = _builtin_entry(entries)
            collision = _collision_message(entries) if len(entries) > 1 and builtin is None else None
            for e in entries:
                error = collision or (_shadow_message(e) if builtin is not None and e is not builtin else None)
                if error is None and load:
                    try:
                        get(group, name)
                    except PluginError as exc:
                        # the row already names group, name, dist and target: keep just the cause
                        cause = exc.__cause__
                        error = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
                infos.append(PluginInfo(group, name, e.value, e.dist, e.version, error))
    # a dist we could not read may or may not carry plugins; listing it beats silently dropping it
    infos += [PluginInfo("?", "?", "?", label, "?", err) for label, err in _unreadable]
    return infos


def render_plugins(infos: list[PluginInfo], loaded: bool = True) -> Table:
    """The plugin listing: one section per group, each plugin on two lines (name, then its `module:attr` target),
    healthy plugins first, broken or colliding ones after them with their error.

    Three borderless columns (plugin, distribution, status) keep it readable at 80 columns: the long target sits
    under the name instead of in a column of its own, and error text wraps at spaces, indented under its plugin.
    `loaded` says whether `infos` came from describe(load=True): it only changes the status wording.
    """
    from rich.console import Group
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    table = Table(title="hmlm plugins", box=None, pad_edge=False, header_style="bold")
    table.add_column("plugin / target", overflow="fold")
    table.add_column("distribution", no_wrap=True)
    table.add_column("status", no_wrap=True)
    ok = [i for i in infos if i.error is None]
    bad = [i for i in infos if i.error is not None]
    for rows, failed in ((ok, False), (bad, True)):
        group = None
        for i in rows:
            if i.group != group:
                group = i.group
                # Text, not markup: names, targets and errors often hold "[...]" that markup would eat
                table.add_row(Text(group + (" (failed to load)" if failed else ""), style="bold"), "", "")
            lines = [Padding(Text(i.name), (0, 0, 0, 2)), Padding(Text(i.value, style="dim"), (0, 0, 0, 4))]
            if failed:
                lines.append(Padding(Text(i.error or "", style="red"), (0, 0, 0, 4)))
                status = Text("failed", style="red")
            else:
                status = Text("ok", style="green") if loaded else Text("not imported", style="dim")
            table.add_row(Group(*lines), Text(f"{i.dist} {i.version}"), status)
    return table


def print_plugins(console: Console | None = None, load: bool = True) -> int:
    """Print the plugin table (the `hmlm plugins` command). Returns the number of broken plugins."""
    from rich.console import Console

    console = console or Console()
    infos = describe(load=load)
    console.print(render_plugins(infos, loaded=load))
    bad = [i for i in infos if i.error is not None]
    if bad:
        console.print(f"[red]{len(bad)} plugin(s) failed to load[/red]; see the rows marked 'failed' above.")
    return len(bad)

"""The plugin registry, exercised through real entry points of throwaway distributions.

Each test writes `<dist>-<version>.dist-info/` folders (METADATA + entry_points.txt) and tiny modules
into a tmp dir, puts it on sys.path, and lets importlib.metadata find them exactly as it finds an
installed package. Fake module names start with `hmlm_fake_` and are purged from sys.modules.
"""
from __future__ import annotations

import importlib.metadata as md
import io
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hmlm import registry
from hmlm.registry import PluginError, PluginInfo

FAKE = "hmlm_fake_"


def _purge_fake_modules() -> None:
    for mod in [m for m in sys.modules if m.startswith(FAKE)]:
        del sys.modules[mod]


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fresh tmp dir on sys.path with an empty registry cache; fake modules cleaned up after."""
    _purge_fake_modules()
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.clear_cache()
    yield tmp_path
    _purge_fake_modules()
    registry.clear_cache()


def make_dist(root: Path, dist: str, entry_points: dict[str, dict[str, str]],
              modules: dict[str, str] | None = None, version: str = "1.0") -> None:
    """Write an installed-looking distribution: dist-info metadata plus module files."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in eps.items()]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    for mod, src in (modules or {}).items():
        (root / f"{mod}.py").write_text(src)


def only_fake(infos: list[PluginInfo]) -> list[PluginInfo]:
    # the real environment also lists hmlm's built-ins; tests look only at their own plugins
    return [i for i in infos if i.dist.startswith(("fake-", "fake_"))]


def scope_to(monkeypatch, root: Path) -> None:
    """Discover only distributions in `root` (so describe(load=True) skips importing the built-ins)."""
    monkeypatch.setattr(registry, "_distributions", lambda: md.distributions(path=[str(root)]))
    registry.clear_cache()


def test_discovery_is_lazy_and_get_imports_only_the_requested_plugin(site):
    make_dist(site, "fake-alpha", {"hmlm.memories": {"alpha-mem": f"{FAKE}alpha:AlphaMemory",
                                                      "beta-mem": f"{FAKE}beta:BetaMemory"}},
              {f"{FAKE}alpha": "class AlphaMemory:\n    pass\n",
               f"{FAKE}beta": "class BetaMemory:\n    pass\n"})
    names = registry.names("memories")
    assert {"alpha-mem", "beta-mem"} <= set(names)
    assert names == sorted(names)
    infos = only_fake(registry.describe(load=False))
    assert {(i.group, i.name, i.value, i.dist, i.version, i.error) for i in infos} == {
        ("memories", "alpha-mem", f"{FAKE}alpha:AlphaMemory", "fake-alpha", "1.0", None),
        ("memories", "beta-mem", f"{FAKE}beta:BetaMemory", "fake-alpha", "1.0", None),
    }
    assert not any(m.startswith(FAKE) for m in sys.modules), "listing must not import plugins"

    cls = registry.get("memories", "alpha-mem")
    assert cls.__name__ == "AlphaMemory" and isinstance(cls, type)
    assert f"{FAKE}alpha" in sys.modules and f"{FAKE}beta" not in sys.modules
    assert registry.get("hmlm.memories", "alpha-mem") is cls  # full group name, served from the cache


def test_get_is_cached_until_clear_cache(site):
    make_dist(site, "fake-c", {"hmlm.routers": {"cached": f"{FAKE}cached:R"}},
              {f"{FAKE}cached": "class R:\n    pass\n"})
    first = registry.get("routers", "cached")
    del sys.modules[f"{FAKE}cached"]
    assert registry.get("routers", "cached") is first  # no re-import while cached
    registry.clear_cache()
    assert registry.get("routers", "cached") is not first  # re-imported after clearing


def test_short_and_full_group_names_and_unknown_group(site):
    make_dist(site, "fake-g", {"hmlm.stores": {"fake-store": f"{FAKE}store:S"}},
              {f"{FAKE}store": "class S:\n    pass\n"})
    assert registry.names("stores") == registry.names("hmlm.stores")
    assert registry.get("stores", "fake-store") is registry.get("hmlm.stores", "fake-store")
    with pytest.raises(PluginError, match=r"unknown plugin group 'memory'; known: anchors, memories"):
        registry.names("memory")
    with pytest.raises(PluginError, match="unknown plugin group"):
        registry.get("hmlm.nope", "x")


def test_unknown_name_lists_known_names(site):
    make_dist(site, "fake-m", {"hmlm.memories": {"fake-zeta": f"{FAKE}z:Z", "fake-eta": f"{FAKE}e:E"}})
    with pytest.raises(PluginError) as info:
        registry.get("memories", "fnn")
    msg = str(info.value)
    assert isinstance(info.value, LookupError)
    assert msg.startswith("unknown memories plugin 'fnn'; known: ")
    assert msg.endswith("(installed plugins: run `hmlm plugins`)")
    known = msg.split("known: ", 1)[1].split(" (installed", 1)[0].split(", ")
    assert known == registry.names("memories") and {"fake-eta", "fake-zeta"} <= set(known)


def test_unknown_name_in_empty_group_says_none(site, monkeypatch):
    scope_to(monkeypatch, site)
    with pytest.raises(PluginError, match=r"unknown anchors plugin 'x'; known: \(none\)"):
        registry.get("anchors", "x")


def test_collision_between_two_distributions_names_both(site):
    make_dist(site, "fake-one", {"hmlm.embedders": {"fake-emb": f"{FAKE}one:E"}},
              {f"{FAKE}one": "class E:\n    pass\n"})
    make_dist(site, "fake-two", {"hmlm.embedders": {"fake-emb": f"{FAKE}two:E",
                                                     "fake-fine": f"{FAKE}two:E"}},
              {f"{FAKE}two": "class E:\n    pass\n"})
    with pytest.raises(PluginError) as info:
        registry.get("embedders", "fake-emb")
    assert "'fake-one'" in str(info.value) and "'fake-two'" in str(info.value)
    assert not any(m.startswith(FAKE) for m in sys.modules), "a collision must not import either side"
    assert registry.get("embedders", "fake-fine").__module__ == f"{FAKE}two"  # other names unaffected

    rows = [i for i in only_fake(registry.describe(load=False)) if i.name == "fake-emb"]
    assert sorted(i.dist for i in rows) == ["fake-one", "fake-two"]
    assert all(i.error and "fake-one" in i.error and "fake-two" in i.error for i in rows)


def test_same_distribution_seen_twice_is_not_a_collision(site, tmp_path_factory, monkeypatch):
    # an editable install is visible through site-packages and through an .egg-info in the cwd:
    # the same dist name and the same target, found on two sys.path entries
    other = tmp_path_factory.mktemp("second_path")
    eps = {"hmlm.anchors": {"fake-anchor": f"{FAKE}anchor:A"}}
    make_dist(site, "fake-dup", eps, {f"{FAKE}anchor": "class A:\n    pass\n"})
    make_dist(other, "fake_dup", eps)  # same dist under a non-normalised spelling
    monkeypatch.syspath_prepend(str(other))
    registry.clear_cache()
    rows = [i for i in only_fake(registry.describe(load=False)) if i.name == "fake-anchor"]
    assert len(rows) == 1 and rows[0].error is None
    assert rows[0].dist == "fake_dup"  # the copy first on sys.path wins, as for imports
    assert registry.get("anchors", "fake-anchor").__name__ == "A"


def test_duplicate_line_in_one_distribution_is_deduped(site):
    info = site / "fake_rep-1.0.dist-info"
    make_dist(site, "fake-rep", {"hmlm.routers": {"fake-r": f"{FAKE}rep:R"}},
              {f"{FAKE}rep": "class R:\n    pass\n"})
    ep_txt = info / "entry_points.txt"
    ep_txt.write_text(ep_txt.read_text() + f"\n[hmlm.routers]\nfake-r = {FAKE}rep:R\n")
    registry.clear_cache()
    assert registry.names("routers").count("fake-r") == 1
    assert registry.get("routers", "fake-r").__name__ == "R"


def test_broken_plugin_is_isolated_and_reported(site, monkeypatch):
    make_dist(site, "fake-mixed", {"hmlm.memories": {"fake-broken": f"{FAKE}broken:M",
                                                     "fake-good": f"{FAKE}good:M",
                                                     "fake-noattr": f"{FAKE}good:Missing"}},
              {f"{FAKE}broken": "raise ImportError('needs triton [gpu]')\n",
               f"{FAKE}good": "class M:\n    pass\n"})
    with pytest.raises(PluginError) as info:
        registry.get("memories", "fake-broken")
    msg = str(info.value)
    assert "fake-broken" in msg and f"{FAKE}broken:M" in msg and "'fake-mixed'" in msg
    assert "ImportError: needs triton [gpu]" in msg
    assert isinstance(info.value.__cause__, ImportError)
    with pytest.raises(PluginError, match="AttributeError") as info:
        registry.get("memories", "fake-noattr")
    assert isinstance(info.value.__cause__, AttributeError)
    assert registry.get("memories", "fake-good").__name__ == "M"  # the rest keep working

    scope_to(monkeypatch, site)  # load=True imports every plugin; keep it to ours
    infos = {i.name: i for i in registry.describe(load=True)}  # never raises
    assert set(infos) == {"fake-broken", "fake-good", "fake-noattr"}
    assert infos["fake-good"].error is None
    assert "ImportError: needs triton [gpu]" in infos["fake-broken"].error
    assert "AttributeError" in infos["fake-noattr"].error


def test_unreadable_distribution_does_not_hide_others(site, monkeypatch):
    make_dist(site, "fake-ok", {"hmlm.stores": {"fake-s": f"{FAKE}s:S"}}, {f"{FAKE}s": "class S:\n    pass\n"})
    make_dist(site, "fake-bad", {})
    (site / "fake_bad-1.0.dist-info" / "entry_points.txt").write_text("[hmlm.stores]\nno equals sign\n")
    scope_to(monkeypatch, site)
    assert registry.names("stores") == ["fake-s"]
    bad = [i for i in registry.describe(load=False) if i.error]
    assert len(bad) == 1 and "fake_bad-1.0.dist-info" in bad[0].dist


def test_render_and_print_plugins(site, monkeypatch):
    from rich.console import Console
    from rich.table import Table

    make_dist(site, "fake-r", {"hmlm.routers": {"fake-ok": f"{FAKE}rok:R", "fake-bad": f"{FAKE}rbad:R"}},
              {f"{FAKE}rok": "class R:\n    pass\n", f"{FAKE}rbad": "raise ImportError('no [cuda] here')\n"},
              version="2.5")
    scope_to(monkeypatch, site)
    infos = registry.describe(load=True)
    assert isinstance(registry.render_plugins(infos), Table)
    out = io.StringIO()
    n_bad = registry.print_plugins(Console(file=out, width=300, color_system=None), load=True)
    text = out.getvalue()
    assert n_bad == 1
    for needle in ("routers", "fake-ok", "fake-bad", "fake-r", "2.5", "ok", "no [cuda] here"):
        assert needle in text, needle
    # the failing plugin sits below the healthy one, in its own section
    assert text.index("fake-ok") < text.index("fake-bad")


def test_plugin_listing_is_readable_at_80_columns(site, monkeypatch):
    # a terminal of 80 columns: nothing wider, every name and `module:attr` target whole on one line (no column
    # folded mid-word), and a long error wraps at spaces under its plugin
    from rich.console import Console

    error = "needs the optional package cuda-toolkit-for-this-plugin, which is not installed here at all"
    make_dist(site, "fake-wide", {"hmlm.routers": {"fake-ok": f"{FAKE}wok:WideRouterWithALongName",
                                                   "fake-bad": f"{FAKE}wbad:R"}},
              {f"{FAKE}wok": "class WideRouterWithALongName:\n    pass\n", f"{FAKE}wbad": f"raise ImportError({error!r})\n"})
    scope_to(monkeypatch, site)
    infos = registry.describe(load=True)
    assert [i.name for i in infos if i.error] == ["fake-bad"]
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(registry.render_plugins(infos))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    for info in infos:
        assert any(line.strip().startswith(info.value) for line in lines), info.value
        assert any(line.strip().split()[:1] == [info.name] for line in lines), info.name
    words = " ".join(line.strip() for line in lines)
    assert f"ImportError: {error}" in words   # wrapped at spaces only: joining the lines restores the message


def test_builtins_are_registered_without_importing_them():
    # pyproject.toml registers hmlm's own plugins like any third party; listing must not need them
    registry.clear_cache()
    try:
        assert "ffn" in registry.names("memories")
        assert {"device", "host"} <= set(registry.names("stores"))
        assert all(i.dist == "hmlm" for i in registry.describe(load=False) if i.name == "ffn")
    finally:
        registry.clear_cache()


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20))
def test_any_unknown_name_raises_listing_known(name):
    known = registry.names("routers")
    if name in known:
        return
    with pytest.raises(PluginError) as info:
        registry.get("routers", name)
    assert f"unknown routers plugin {name!r}; known: {', '.join(known) or '(none)'} " in str(info.value)

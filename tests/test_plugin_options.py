"""Plugin-owned options, plugins resolved when a recipe is loaded, built-ins that cannot be shadowed, the plugin API
version, and model.json's record of the distributions that provided each plugin."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, tiny_recipe_dict
from hmlm import registry
from hmlm.cli import main
from hmlm.config import RecipeError, load_recipe, recipe_from_dict
from hmlm.registry import PluginError
from test_registry import FAKE, make_dist, site  # noqa: F401  (the `site` fixture)

ROUTER_WITH_OPTIONS = '''
from dataclasses import dataclass
from hmlm.routers.hkmeans import HierarchicalKMeans

class R(HierarchicalKMeans):
    name = "fake-router"

    @dataclass
    class Options:
        candidates: int = 1
        mode: str = "fast"

        def __post_init__(self):
            if self.candidates < 1:
                raise ValueError(f"candidates must be >= 1, got {self.candidates}")

    seen = []

    @classmethod
    def from_config(cls, cfg, *, seed, options):
        cls.seen.append(options)
        return cls(cfg.branching, cfg.levels, iters=cfg.iters, batch_size=cfg.batch_size, seed=seed)
'''


@pytest.fixture
def fake_router(site):  # noqa: F811
    make_dist(site, "fake-router-dist", {"hmlm.routers": {"fake-router": f"{FAKE}router:R"}},
              {f"{FAKE}router": ROUTER_WITH_OPTIONS}, version="2.5")
    return site


def write_recipe(tmp_path, small_corpus, **overrides):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(small_corpus, tmp_path / "run", **overrides)))
    return path


def test_options_reach_the_plugin_typed(fake_router, small_corpus, tmp_path):
    from hmlm.index import build_router

    path = write_recipe(tmp_path, small_corpus, **{"index.router.name": "fake-router"})
    recipe = load_recipe(path, ["index.router.options.candidates=8"])
    assert recipe.index.router.options == {"candidates": 8}
    build_router(recipe)
    opts = registry.get("routers", "fake-router").seen[-1]
    assert type(opts).__name__ == "Options" and (opts.candidates, opts.mode) == (8, "fast")


@pytest.mark.parametrize("override, message", [
    ("index.router.options.candidatez=8", r"r\.yaml: unknown key `index.router.options.candidatez`; known keys under "
                                          r"`index.router.options`: candidates, mode"),
    ("index.router.options.candidates=many", r"r\.yaml: key `index.router.options.candidates`: .*many"),
    ("index.router.options.candidates=0", r"r\.yaml: key `index.router.options`: candidates must be >= 1, got 0"),
])
def test_bad_options_name_file_and_key(fake_router, small_corpus, tmp_path, override, message):
    path = write_recipe(tmp_path, small_corpus, **{"index.router.name": "fake-router"})
    with pytest.raises(RecipeError, match=message):
        load_recipe(path, [override])


def test_a_plugin_without_options_refuses_them(small_corpus, tmp_path):
    path = write_recipe(tmp_path, small_corpus)
    with pytest.raises(RecipeError, match=r"key `memory.options`: plugin 'FFNMemory' takes no options, got knn"):
        load_recipe(path, ["memory.options.knn=3"])


def test_unknown_plugin_fails_at_load_and_dry_run_before_indexing(small_corpus, tmp_path, capsys):
    path = write_recipe(tmp_path, small_corpus, **{"index.router.name": "nope"})
    assert main(["fit", "--recipe", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "r.yaml: key `index.router.name`: unknown routers plugin 'nope'" in " ".join(err.split())
    assert not (tmp_path / "run").exists()  # nothing indexed, nothing written


def test_a_plugin_that_fails_to_import_is_reported_at_load(site, small_corpus, tmp_path):  # noqa: F811
    make_dist(site, "fake-broken", {"hmlm.memories": {"broken": f"{FAKE}broken:M"}},
              {f"{FAKE}broken": "import a_module_that_is_not_there\n"})
    with pytest.raises(RecipeError, match=r"key `memory.type`: cannot load memories plugin 'broken' .*"
                                          r"fake-broken.*ModuleNotFoundError"):
        recipe_from_dict(tiny_recipe_dict(small_corpus, tmp_path / "run", **{"memory.type": "broken"}), "r.yaml")


def test_builtin_names_cannot_be_shadowed(site):  # noqa: F811
    make_dist(site, "fake-shadow", {"hmlm.memories": {"ffn": f"{FAKE}shadow:M"}}, {f"{FAKE}shadow": "class M: pass\n"})
    from hmlm.memories.ffn import FFNMemory

    assert registry.get("memories", "ffn") is FFNMemory   # hmlm keeps its own: the built-in is not disabled
    row = [i for i in registry.describe(load=False) if i.name == "ffn" and i.dist == "fake-shadow"][0]
    assert "uses the name of an hmlm built-in, which cannot be replaced" in row.error
    assert registry.provenance("memories", "ffn")["dist"] == "hmlm"


def test_plugin_api_version_is_checked(site):  # noqa: F811
    make_dist(site, "fake-future", {"hmlm.memories": {"future": f"{FAKE}future:M"}},
              {f"{FAKE}future": "class M:\n    hmlm_plugin_api = 99\n"}, version="3.0")
    with pytest.raises(PluginError, match=r"'future' from distribution 'fake-future' 3.0 is written for hmlm plugin "
                                          r"API 99; this hmlm provides API 2"):
        registry.get("memories", "future")


def test_index_fingerprint_ignores_empty_options(small_corpus, tmp_path):
    from hmlm.index import fingerprint

    d = tiny_recipe_dict(small_corpus, tmp_path / "run")
    base = fingerprint(recipe_from_dict(d))
    d["index"]["router"]["options"] = {}
    assert fingerprint(recipe_from_dict(d)) == base


def test_model_json_records_plugin_distributions(tiny_model_dir):
    meta = json.loads((tiny_model_dir / "model.json").read_text())
    rows = {r["key"]: r for r in meta["plugins"]}
    assert rows["memory.type"]["name"] == "ffn" and rows["memory.type"]["dist"] == "hmlm"
    assert set(rows) == {"anchor.name", "memory.type", "memory.store", "index.router.name", "index.embedder.name"}


def test_loading_a_model_of_an_uninstalled_plugin_names_the_package(tiny_model_dir, tmp_path):
    import shutil

    from hmlm.export import load_model_dir

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["plugins"] = [{**r, "name": "relu2", "dist": "hmlm-relu2-memory", "version": "0.1.0"}
                       if r["key"] == "memory.type" else r for r in meta["plugins"]]
    meta["recipe"]["memory"]["type"] = "relu2"
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PluginError, match=r"trained with the memories plugin 'relu2' \(`memory.type`\) from the "
                                          r"distribution 'hmlm-relu2-memory' 0.1.0, which is not installed here; "
                                          r"install it \(pip install 'hmlm-relu2-memory==0.1.0'\)"):
        load_model_dir(copy, verify=False)


def test_plugins_table_fits_80_columns():
    import io

    from rich.console import Console

    out = io.StringIO()
    registry.print_plugins(Console(file=out, width=80), load=False)
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any("ffn" in line and "hmlm 0.1.0" in line for line in lines)  # one row per plugin, not wrapped cells


def test_bench_memory_types_all_includes_plugin_types(site):  # noqa: F811
    from hmlm.bench.memory_types import resolve_types

    make_dist(site, "fake-mem", {"hmlm.memories": {"fake-mem": f"{FAKE}mem:M"}}, {f"{FAKE}mem": "class M: pass\n"})
    assert "fake-mem" in resolve_types("all") and {"ffn", "kv"} <= set(resolve_types("all"))
    assert resolve_types("ffn,fake-mem") == ["ffn", "fake-mem"]

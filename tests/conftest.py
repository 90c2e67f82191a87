"""Shared fixtures: a small corpus from the bundled data and a tiny recipe that trains in seconds on CPU."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HMLM_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "hmlm-test"))

REPO = Path(__file__).resolve().parent.parent

from hmlm.testing import assert_per_sample_isolation  # noqa: E402,F401  (tests import it from here; the kit owns it)


def load_benchmark(name: str):
    """benchmarks/<name>.py (a script, not a module of the package) loaded as a module, for its functions."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_small_corpus(path: Path, n_docs: int = 400) -> Path:
    """Every k-th document of the bundled corpus (facts and real text), deterministic."""
    from hmlm.data.bundled import build_bundled_corpus

    src = build_bundled_corpus(seed=0)
    lines = src.read_text(encoding="utf-8").splitlines()
    step = max(1, len(lines) // n_docs)
    path.write_text("\n".join(lines[::step][:n_docs]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    return write_small_corpus(tmp_path_factory.mktemp("corpus") / "small.jsonl")


def tiny_recipe_dict(corpus: Path, out_dir: Path, **overrides) -> dict:
    """A recipe small enough to index and train a few steps in seconds (hashing embedder, 2-layer anchor)."""
    d = {
        "name": "tiny",
        "seed": 0,
        "out_dir": str(out_dir),
        "data": {"corpus": str(corpus), "seq_len": 64, "val_fraction": 0.05,
                 "tokenizer": {"kind": "bpe", "vocab_size": 512}},
        "index": {"embedder": {"name": "hashing", "dim": 64},
                  "router": {"branching": 3, "levels": 3, "iters": 5, "batch_size": 256}},
        "anchor": {"options": {"preset": "tiny", "n_layers": 2, "d_model": 32, "n_heads": 2, "head_dim": 16,
                               "ffn_dim": 64}},
        "memory": {"type": "ffn", "sizes": [8, 4, 2]},
        "optim": {"anchor": {"lr": 3e-3, "warmup_steps": 2}, "memory": {"lr": 3e-3, "warmup_steps": 2}},
        "trainer": {"mode": "scratch", "max_steps": 6, "batch_size": 4, "accelerator": "cpu",
                    "val_every": 3, "val_batches": 2, "ckpt_every": 3, "log_every": 1},
    }
    for key, value in overrides.items():
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return d


@pytest.fixture
def tiny_recipe(small_corpus, tmp_path):
    from hmlm.config import recipe_from_dict

    def make(**overrides):
        out = overrides.pop("out_dir", tmp_path / "run")
        return recipe_from_dict(tiny_recipe_dict(small_corpus, out, **overrides))

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, small_corpus) -> Path:
    """A tiny model trained once per session (scratch mode, FFN memory); returns its model directory."""
    from hmlm.config import recipe_from_dict
    from hmlm.train.fit import fit

    out = tmp_path_factory.mktemp("tiny-model") / "run"
    recipe = recipe_from_dict(tiny_recipe_dict(small_corpus, out, **{"trainer.max_steps": 20}))
    result = fit(recipe, progress=False, final_eval=False)
    return Path(result["model_dir"])


# the example third-party plugins in plugins/ (each its own package) and their top-level modules
EXAMPLE_PLUGINS = ("hmlm-relu2-memory", "hmlm-pkm", "hmlm-randproj-router")
EXAMPLE_MODULES = ("hmlm_relu2_memory", "hmlm_pkm", "hmlm_randproj_router")


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory):
    """The example packages installed (one pip call) into a throwaway site-packages, as `pip install` would."""
    site = tmp_path_factory.mktemp("plugin-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), *(str(REPO / "plugins" / p) for p in EXAMPLE_PLUGINS)], check=True,
                   capture_output=True)
    return site


@pytest.fixture
def installed_plugin(plugin_site, monkeypatch):
    """The example plugins visible to the registry for one test (recipes/plugins/*.yaml need them)."""
    from hmlm import registry

    monkeypatch.syspath_prepend(str(plugin_site))
    registry.clear_cache()
    yield
    for mod in [m for m in sys.modules if m.startswith(EXAMPLE_MODULES)]:
        sys.modules.pop(mod, None)
    registry.clear_cache()


def read_metrics(out_dir: Path) -> list[dict]:
    import csv

    rows = []
    for path in sorted((Path(out_dir) / "logs").glob("**/metrics.csv")):
        with open(path, encoding="utf-8") as f:
            rows.extend(csv.DictReader(f))
    return rows


def json_load(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int, per_node: int | None = None) -> None:
    """The environment torchrun gives process `rank` (node-major ranks, `per_node` per node; default one node):
    Lightning then uses these processes instead of launching its own."""
    import os

    per_node = per_node or world
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank % per_node), "LOCAL_WORLD_SIZE": str(per_node),
                       "GROUP_RANK": str(rank // per_node), "NODE_RANK": str(rank // per_node)})


def fit_each(recipes: dict, resumed: str | None = None) -> None:
    """`fit` every recipe in order; the one named `resumed` trains 2 steps, then resumes to its max_steps."""
    from hmlm.config import recipe_from_dict
    from hmlm.train.fit import fit

    for name, d in recipes.items():
        if name == resumed:
            fit(recipe_from_dict({**d, "trainer": {**d["trainer"], "max_steps": 2}}), progress=False,
                final_eval=False)
            fit(recipe_from_dict(d), resume=True, progress=False, final_eval=False)
        else:
            fit(recipe_from_dict(d), progress=False, final_eval=False)

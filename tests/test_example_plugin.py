"""The example plugins in plugins/ install like any third-party package, pass their own kit-based tests and train."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import EXAMPLE_PLUGINS, REPO, assert_per_sample_isolation
from hmlm import registry



def test_example_plugins_pass_their_own_tests(plugin_site):
    """What a plugin author runs: `pytest` on the package's tests, against the installed plugin and hmlm.testing
    (one pytest process for the three packages: its start-up, importing torch, is most of the time)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                           *(f"{p}/tests" for p in EXAMPLE_PLUGINS)], cwd=REPO / "plugins", env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    passed = [line for line in done.stdout.splitlines() if line.startswith("PASSED ")]
    for kit_class in ("test_relu2.py::TestReLU2::", "test_pkm.py::TestPKM::", "test_randproj.py::TestRandProj::"):
        assert any(kit_class in line for line in passed), f"no kit test of {kit_class} ran"


def test_example_plugin_registers_and_trains(installed_plugin, tiny_recipe):
    from hmlm.bank.layout import BankLayout
    from hmlm.bank.stores import DeviceStore
    from hmlm.model import MemoryLM, build_anchor
    from hmlm.train.fit import fit

    info = {(p.group, p.name): p for p in registry.describe()}
    assert info[("memories", "relu2")].dist == "hmlm-relu2-memory" and info[("memories", "relu2")].error is None
    recipe = tiny_recipe(**{"memory.type": "relu2", "trainer.max_steps": 2})
    anchor = build_anchor(recipe, 128)
    layout = BankLayout(registry.get("memories", "relu2")(), anchor.shape, (8, 4, 2), 3, (0, 1))
    model = MemoryLM(anchor, layout, DeviceStore(layout, seed=0))
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    paths = torch.stack([torch.randint(0, 3 ** (l + 1), (4,)) for l in range(3)], 1)
    torch.testing.assert_close(model(ids, paths=paths, memory="fetched"), model(ids, memory="none"), rtol=0, atol=0)
    with torch.no_grad():
        for key in ("l0", "l1", "l2"):
            model.store.tensors[key]["down"].normal_(generator=torch.Generator().manual_seed(1))
    assert_per_sample_isolation(model, ids, paths, 1, 3)
    result = fit(recipe, progress=False, final_eval=False)
    assert result["steps"] == 2


def test_pkm_memory_and_randproj_router_train_from_recipe_options(installed_plugin, tiny_recipe):
    """Both new example plugins take their options from the recipe, index, train, export and load again."""
    from hmlm.export import load_model_dir
    from hmlm.train.fit import fit

    recipe = tiny_recipe(**{"memory.type": "pkm", "memory.sizes": [2, 1, 1],
                            "memory.options": {"subkeys": 4, "knn": 2},
                            "index.router.name": "randproj", "index.router.options": {"candidates": 3},
                            "trainer.max_steps": 2})
    result = fit(recipe, progress=False, final_eval=False)
    assert result["steps"] == 2
    meta = json.loads((Path(result["model_dir"]) / "model.json").read_text())
    used = {r["key"]: (r["name"], r["dist"], r["version"]) for r in meta["plugins"]}
    assert used["memory.type"] == ("pkm", "hmlm-pkm", "0.1.0")
    assert used["index.router.name"] == ("randproj", "hmlm-randproj-router", "0.1.0")
    assert meta["router"]["fit_stats"]["candidates"] == 3
    loaded = load_model_dir(result["model_dir"])
    assert loaded.model.layout.memory.options.knn == 2
    assert loaded.route(["Hydrogen has atomic number 1."]).shape == (1, 3)

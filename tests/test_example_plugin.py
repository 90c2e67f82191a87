"""The example plugin in plugins/ installs like any third-party package and works through the registry."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO, assert_per_sample_isolation
from hmlm import registry


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(REPO / "plugins" / "hmlm-relu2-memory")], check=True,
                   capture_output=True)
    monkeypatch.syspath_prepend(str(site))
    registry.clear_cache()
    yield
    sys.modules.pop("hmlm_relu2_memory", None)
    registry.clear_cache()


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

"""Tiers per level: the plan (auto from budgets and reuse, or given), the recipe keys and their errors, `--dry-run`,
and identical values and training whichever tier holds each level (device vs host vs disk)."""
from __future__ import annotations

import pytest
import torch

from conftest import REPO, read_metrics
from hmlm.bank.layout import BankLayout
from hmlm.bank.stores import TieredStore
from hmlm.bank.tiers import GiB, LevelPlan, TierError, normalize_tiers, plan_levels
from hmlm.cli import main
from hmlm.memories.ffn import FFNMemory
from hmlm.protocols import AnchorShape

K = 3
SHAPE = AnchorShape(n_layers=2, d_model=8, n_heads=1, head_dim=8, ffn_dim=16)


def test_normalize_tiers():
    assert normalize_tiers("auto", [4, 2, 1]) is None
    assert normalize_tiers("host", [4, 2, 1]) == ["host"] * 3
    assert normalize_tiers(["disk"], [4, 2]) == ["disk", "disk"]
    assert normalize_tiers(["device", "host", "disk"], [4, 2, 1]) == ["device", "host", "disk"]
    # one per level with memory: the paper's (256,64,16,0) takes three tiers
    assert normalize_tiers(["device", "host", "disk"], [4, 2, 1, 0]) == ["device", "host", "disk", "device"]
    with pytest.raises(TierError, match="2 tiers"):
        normalize_tiers(["device", "host"], [4, 2, 1])
    with pytest.raises(TierError, match="unknown tier 'ssd'"):
        normalize_tiers(["device", "ssd", "disk"], [4, 2, 1])


def plans():
    # the paper's 160M bank: 16 x 13.8M, 256 x 3.4M, 4096 x 0.86M parameters, bf16 + fp32 moments, batch 16
    out = []
    for lvl, (nodes, per) in enumerate([(16, 13_762_560), (256, 3_440_640), (4096, 860_160)]):
        params = nodes * per
        out.append(LevelPlan(f"l{lvl}", lvl + 1, nodes, params, 2 * params, 8 * params, min(1.0, 16 / nodes)))
    return out


def test_auto_plan_puts_hot_shallow_levels_on_the_device():
    levels = plan_levels(plans(), None, device_budget=12 * GiB, host_budget=100 * GiB)
    assert [lp.tier for lp in levels] == ["device", "device", "host"]
    levels = plan_levels(plans(), None, device_budget=3 * GiB, host_budget=20 * GiB)
    assert [lp.tier for lp in levels] == ["device", "host", "disk"]
    levels = plan_levels(plans(), ["host", "disk", "device"], device_budget=0, host_budget=0)
    assert [lp.tier for lp in levels] == ["host", "disk", "device"]


def test_recipe_keys_and_errors(tiny_recipe):
    r = tiny_recipe(**{"memory.tiers": ["device", "host", "disk"], "memory.optim_state": "bf16"})
    assert r.memory.tiers == ["device", "host", "disk"] and r.memory.optim_state == "bf16"
    from hmlm.config import RecipeError

    with pytest.raises(RecipeError, match="memory.tiers"):
        tiny_recipe(**{"memory.tiers": ["device", "host"]})
    with pytest.raises(RecipeError, match="memory.store=tiered"):
        tiny_recipe(**{"memory.store": "host", "memory.tiers": ["device", "host", "disk"]})
    with pytest.raises(RecipeError, match="memory.optim_state"):
        tiny_recipe(**{"memory.optim_state": "int8"})


def test_dry_run_prints_tiers_and_bytes(capsys):
    code = main(["fit", "--recipe", str(REPO / "recipes/quickstart.yaml"), "--dry-run", "anchor.options.preset=160m",
                 "anchor.vocab_size=50432", "index.router.branching=16", "index.router.levels=4",
                 "memory.sizes=[256,64,16,0]", "memory.dtype=bfloat16", "memory.store=tiered",
                 "memory.tiers=auto", "memory.device_budget_gb=12", "memory.host_budget_gb=100",
                 "memory.optim_state=bf16", "trainer.batch_size=16"])
    out = capsys.readouterr().out
    assert code == 0
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert "tier=device" in lines["bank level 1"] and "tier=device" in lines["bank level 2"]
    assert "tier=host" in lines["bank level 3"]
    assert lines["bank bytes (host)"] == str(4096 * 860_160 * 2)
    assert lines["optimizer state bytes (host)"] == str(4096 * 860_160 * 4)


def test_fit_builds_the_store_with_the_auto_plan(tiny_recipe, tmp_path):
    """`memory.tiers: auto` is planned from the budgets when the model is built (hmlm fit builds it so): the hot
    level that fits the device budget goes there, the next one to host RAM, the rest to disk."""
    from hmlm.model import build_model, size_report

    big = tiny_recipe(**{"memory.tiers": "auto", "memory.device_budget_gb": 1.0, "memory.host_budget_gb": 1.0})
    levels = size_report(big, 512)["bank_levels"]
    assert [lvl["tier"] for lvl in levels] == ["device"] * 3
    need = [lvl["bytes"] + lvl["state_bytes"] for lvl in levels]
    recipe = tiny_recipe(**{"memory.tiers": "auto", "memory.device_budget_gb": (need[0] + 1) / GiB,
                            "memory.host_budget_gb": (need[1] + 1) / GiB, "memory.disk_dir": str(tmp_path / "d")})
    model = build_model(recipe, 512)
    assert [model.store.tier_of(f"l{i}") for i in range(3)] == ["device", "host", "disk"]
    assert [lp.tier for lp in model.store.plan if lp.level] == ["device", "host", "disk"]
    model.store.to_compute(torch.device("cpu"))  # levels are created where the plan put them
    assert any((tmp_path / "d").iterdir())
    model.store.close()


def layout() -> BankLayout:
    return BankLayout(FFNMemory(), SHAPE, (3, 2, 1), K, (0, 1))


TIER_PLANS = [["device"] * 3, ["host"] * 3, ["disk"] * 3, ["host", "disk", "device"]]


def test_initial_values_identical_on_every_tier(tmp_path):
    stores = [TieredStore(layout(), seed=7, tiers=t, disk_dir=tmp_path / str(i)) for i, t in enumerate(TIER_PLANS)]
    for key in stores[0].keys():
        ref = stores[0].read_rows(key).params
        assert ref.abs().sum() > 0
        for s in stores[1:]:
            assert torch.equal(s.read_rows(key).params, ref), (key, s.tiers)
    for s in stores:
        s.close()


def test_fit_losses_identical_whichever_tier_holds_each_level(tiny_recipe, tmp_path, capsys):
    from hmlm.export import load_model_dir
    from hmlm.train.fit import fit

    runs = {}
    for name, tiers in (("device", "device"), ("mixed", ["host", "disk", "device"])):
        recipe = tiny_recipe(**{"out_dir": str(tmp_path / name), "index.dir": str(tmp_path / "index"),
                                "trainer.max_steps": 4, "trainer.ckpt_every": 100, "trainer.val_every": 2,
                                "memory.tiers": tiers, "memory.io_threads": 2})
        fit(recipe, progress=False, final_eval=False)
        assert f"bank tiers (memory.tiers={tiers}): l0=" in " ".join(capsys.readouterr().out.split())
        runs[name] = ({int(r["step"]): r["train/loss"] for r in read_metrics(tmp_path / name) if r.get("train/loss")},
                      {int(r["step"]): r["val/ppl_fetched"] for r in read_metrics(tmp_path / name)
                       if r.get("val/ppl_fetched")})
    assert runs["device"] == runs["mixed"] and len(runs["device"][0]) == 4
    a, b = load_model_dir(tmp_path / "device" / "model"), load_model_dir(tmp_path / "mixed" / "model")
    assert b.meta["memory"]["tiers"] == {"l0": "host", "l1": "disk", "l2": "device", "generic": "device"}
    for key in a.model.store.keys():
        assert torch.equal(a.model.store.read_rows(key).params, b.model.store.read_rows(key).params), key

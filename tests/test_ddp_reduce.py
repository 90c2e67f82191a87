"""trainer.ddp (hmlm.train.ddp, docs/distributed.md): the anchor's DDP gradient all-reduce in bf16, DDP's bucket size
and gradient views. Two gloo processes under Lightning's DDP train the same run with fp32 and with bf16 reduction, in
subtree and in replicated mode; the bf16 run stays close to the fp32 one, and the comm counter (one hook that counts
and compresses) reports half the anchor's gradient bytes."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import fit_each, free_port, tiny_recipe_dict, torchrun_env
from hmlm.config import RecipeError

STEPS = 4
LR = 3e-3  # the tiny recipe's optim.anchor.lr (and the bank's)
# 0.02 MiB buckets split the tiny anchor's 148,608-byte gradient into several all-reduces, so bucket_mb must reach DDP
BUCKET_MB = 0.02
COMMON = {"trainer.max_steps": STEPS, "trainer.batch_size": 2, "trainer.val_every": 1000,
          "trainer.ckpt_every": 1000, "trainer.accelerator": "cpu", "trainer.devices": 2, "trainer.strategy": "ddp",
          "trainer.ddp.bucket_mb": BUCKET_MB, "memory.generic": False}
MODES = {"subtree": {"trainer.data_parallel": "subtree", "trainer.subtree_level": 1},
         "replicated": {"trainer.data_parallel": "replicated"}}


def _worker(rank: int, port: int, recipes: dict) -> None:
    torchrun_env(rank, 2, port)
    torch.set_num_threads(1)
    fit_each(recipes)


@pytest.fixture(scope="module")
def runs(small_corpus, tmp_path_factory):
    from rich.console import Console

    from hmlm.config import recipe_from_dict
    from hmlm.index import ensure_index

    root = tmp_path_factory.mktemp("ddp-reduce")
    recipes = {}
    for mode, extra in MODES.items():
        for reduce in ("fp32", "bf16"):
            recipes[(mode, reduce)] = tiny_recipe_dict(
                small_corpus, root / f"{mode}-{reduce}",
                **{**COMMON, **extra, "index.dir": str(root / "index"), "trainer.ddp.grad_reduce": reduce})
    ensure_index(recipe_from_dict(recipes[("subtree", "fp32")]), Console(quiet=True))
    torch.multiprocessing.spawn(_worker, args=(free_port(), {f"{m}-{r}": d for (m, r), d in recipes.items()}),
                                nprocs=2, join=True)
    return {key: root / f"{key[0]}-{key[1]}" for key in recipes}


def _losses(run: Path) -> list[float]:
    (metrics,) = run.glob("logs/**/metrics.csv")  # logs/ or logs/<segment>/ after a resume
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_bf16_reduction_stays_close_to_fp32(runs, mode):
    """Tolerances: bf16 keeps 8 mantissa bits, so a reduced gradient element is off by ~2**-8 relative, and by up to
    its whole size where the two ranks' gradients nearly cancel. AdamW normalises every update to ~lr per element
    whatever the gradient's scale, so one weight of the two runs can differ by at most ~2*lr per step (each run moving
    ~lr the other way): 2*lr*STEPS. Typically the update moves by the gradient's relative error, ~0.4% of lr per
    step; the mean bound, 5% of lr, leaves a 10x margin over that (measured: max 0.77*lr, mean 0.003*lr). The loss
    sees the weights only through the model: measured within 5e-6 relative, asserted within 1e-4. The first loss is
    computed before any reduction and is identical."""
    from hmlm.export import load_model_dir

    fp32 = load_model_dir(runs[(mode, "fp32")] / "model").model.anchor.state_dict()
    bf16 = load_model_dir(runs[(mode, "bf16")] / "model").model.anchor.state_dict()
    diffs = torch.cat([(bf16[k] - fp32[k]).abs().flatten() for k in fp32 if fp32[k].is_floating_point()])
    assert diffs.max() <= 2 * LR * STEPS, diffs.max()
    assert diffs.mean() <= 0.05 * LR, diffs.mean()
    # the reduction really ran in bf16: fp32 and bf16 sums of the same two gradients round differently
    assert diffs.max() > 0
    a, b = _losses(runs[(mode, "fp32")]), _losses(runs[(mode, "bf16")])
    assert len(a) == len(b) == STEPS and a[0] == b[0]
    assert all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b)), (a, b)


def test_counter_reports_the_bytes_sent(runs):
    """One hook counts and compresses: under bf16 each rank sends half the anchor's fp32 gradient bytes per step, in
    as many buckets as fp32 (bucket_mb sizes the fp32 buckets)."""
    info = {r: [json.loads((runs[("subtree", r)] / "ranks" / f"rank-{k:03d}" / "rank.json").read_text())
                for k in range(2)] for r in ("fp32", "bf16")}
    for reduce, ranks in info.items():
        for i in ranks:
            comm, steps, grad = i["comm"], i["segment_steps"], i["anchor_grad_bytes"]
            assert steps == STEPS and comm["anchor_reduce"] == reduce
            assert comm["anchor_bytes"] == steps * grad // (2 if reduce == "bf16" else 1)
            # DDP's buckets follow trainer.ddp.bucket_mb: more than one all-reduce per step for this anchor
            assert comm["anchor_calls"] >= steps * 2
    assert info["fp32"][0]["comm"]["anchor_calls"] == info["bf16"][0]["comm"]["anchor_calls"]


def test_strategy_carries_the_ddp_keys(tiny_recipe):
    from hmlm.train.ddp import build_ddp_strategy, ddp_kwargs

    recipe = tiny_recipe(**{"trainer.strategy": "ddp", "trainer.ddp.bucket_mb": 50, "trainer.ddp.bucket_view": False})
    assert ddp_kwargs(recipe.trainer.ddp) == {"bucket_cap_mb": 50.0, "gradient_as_bucket_view": False}
    for mode in ("replicated", "subtree"):
        strategy = build_ddp_strategy(tiny_recipe(**{"trainer.strategy": "ddp", "trainer.data_parallel": mode}))
        # Lightning hands these to DistributedDataParallel(...)
        assert strategy._ddp_kwargs == {"bucket_cap_mb": 25.0, "gradient_as_bucket_view": True}


@pytest.mark.parametrize("override,key,hint", [
    ({"trainer.strategy": "ddp", "trainer.ddp.grad_reduce": "fp16"}, "trainer.ddp.grad_reduce", "fp32 or bf16"),
    ({"trainer.strategy": "ddp", "trainer.ddp.bucket_mb": 0}, "trainer.ddp.bucket_mb", "> 0"),
    ({"trainer.ddp.grad_reduce": "bf16"}, "trainer.ddp.grad_reduce", "set trainer.strategy=ddp"),
    ({"trainer.strategy": "deepspeed_stage_2", "trainer.ddp.bucket_mb": 50}, "trainer.ddp.bucket_mb",
     "trainer.deepspeed.bucket_mb"),
])
def test_bad_ddp_values_name_the_key(tiny_recipe, override, key, hint):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")) as err:
        tiny_recipe(**override)
    assert hint in str(err.value)

"""`hmlm bench scaling` on CPU (gloo, 2 processes): rows for both modes, the training plan's ownership (no bank bytes
in subtree mode at level 1), the dense bank all-reduce in replicated mode, anchor bytes equal to the anchor's
gradient, each rank holding its share of the bank; the plan from uniform paths and from an index's real paths; the
anchor under a DeepSpeed ZeRO engine."""
from __future__ import annotations

import numpy as np
import pytest

from hmlm.bench.scaling import run_scaling, scaling_paths, uniform_paths
from hmlm.train.affine import plan_subtrees


def test_uniform_paths_follow_the_router_numbering():
    paths, tokens = uniform_paths(500, 3, 3, seed=0)
    assert paths.shape == (500, 3) and (tokens == 1).all()
    assert (paths[:, 1] // 3 == paths[:, 0]).all() and (paths[:, 2] // 3 == paths[:, 1]).all()
    assert len(np.unique(paths[:, 2])) > 20  # spread over the leaves


def test_bench_plans_like_training(tiny_recipe, tmp_path):
    """--paths index reads every training sequence's path and token count, as `hmlm fit` plans them."""
    from rich.console import Console

    from hmlm.index import ensure_index
    from hmlm.train.affine import plan_for_recipe

    recipe = tiny_recipe(**{"index.dir": str(tmp_path / "index")})
    ensure_index(recipe, Console(quiet=True))
    paths, tokens = scaling_paths(recipe, "index")
    bench_plan = plan_subtrees(paths, tokens, world=2, branching=3, level=recipe.trainer.subtree_level)
    fit_plan = plan_for_recipe(recipe, tmp_path / "index", 2)
    assert np.array_equal(bench_plan.owner, fit_plan.owner) and bench_plan.level == fit_plan.level
    with pytest.raises(ValueError, match="holds no index"):
        scaling_paths(tiny_recipe(**{"index.dir": str(tmp_path / "none")}), "index")


def test_scaling_bench_on_two_cpu_processes(tiny_recipe, tmp_path):
    recipe = tiny_recipe(**{"index.router.branching": 2, "trainer.batch_size": 2, "data.seq_len": 16,
                            "trainer.subtree_level": 1})
    rows = run_scaling(recipe, vocab_size=128, worlds=[1, 2], modes=["subtree", "replicated"], steps=2, warmup=1,
                       out=tmp_path / "rows.json", profile=tmp_path / "prof")
    by = {(r["mode"], r["world"]): r for r in rows}
    assert set(by) == {("subtree", 1), ("subtree", 2), ("replicated", 1), ("replicated", 2)}
    sub, rep = by[("subtree", 2)], by[("replicated", 2)]
    anchor_bytes = sub["anchor_bytes_per_step"]
    assert anchor_bytes > 0 and rep["anchor_bytes_per_step"] == anchor_bytes == sub["anchor_grad_bytes"]
    assert all(r["grad_reduce"] == "fp32" for r in rows)
    assert sub["bank_bytes_per_step"] == 0 and sub["plan_level"] == 1
    assert rep["bank_bytes_per_step"] == rep["bank_params"] * 4
    assert sub["bank_params_per_rank"] * 2 == sub["bank_params"] == rep["bank_params_per_rank"]
    assert sub["bank_bytes_per_rank"] == sub["bank_params_per_rank"] * 4
    assert (tmp_path / "rows.json").is_file()
    # --profile: rank 0's table per row, taken while every rank steps (a rank left out would hang the collectives)
    assert sorted(r["profile"]["table"] for r in rows) == sorted(
        f"ddp_{m}_world{w}.txt" for m in ("subtree", "replicated") for w in (1, 2))
    assert all((tmp_path / "prof" / r["profile"]["table"]).read_text().startswith("profile of ") for r in rows)


def test_scaling_bench_reduces_the_anchor_in_bf16(tiny_recipe, tmp_path):
    """trainer.ddp reaches the bench's DDP as it reaches `hmlm fit`'s: bf16 reduction sends half the anchor's bytes."""
    recipe = tiny_recipe(**{"index.router.branching": 2, "trainer.batch_size": 2, "data.seq_len": 16,
                            "trainer.subtree_level": 1, "trainer.strategy": "ddp", "trainer.ddp.grad_reduce": "bf16"})
    (row,) = run_scaling(recipe, vocab_size=128, worlds=[2], modes=["subtree"], steps=2, warmup=1,
                         profile=tmp_path / "prof")
    assert row["grad_reduce"] == "bf16" and row["tokens_per_s"] > 0
    assert row["profile"]["table"] == "ddp_bf16_subtree_world2.txt"  # beside, not over, the fp32 row's table
    assert row["anchor_bytes_per_step"] * 2 == row["anchor_grad_bytes"]


def test_scaling_bench_shared_blocks_and_deepspeed(tiny_recipe, tmp_path):
    """Level-2 subtrees (k=3, 2 ranks): some level-1 blocks are shared and reduced in their owner groups (bank bytes > 0, as in
    training); the anchor under ZeRO stage 2."""
    pytest.importorskip("deepspeed")
    recipe = tiny_recipe(**{"trainer.batch_size": 2, "data.seq_len": 16, "trainer.subtree_level": 2})
    rows = run_scaling(recipe, vocab_size=128, worlds=[2], modes=["subtree"], steps=2, warmup=1,
                       strategies=("deepspeed_stage_2",))
    (row,) = rows
    assert row["strategy"] == "deepspeed_stage_2" and row["plan_level"] == 2 and row["tokens_per_s"] > 0
    assert row["anchor_bytes_per_step"] is None  # reduced inside the engine, not counted
    paths, tokens = uniform_paths(4096, 3, 3, seed=0)  # what the bench planned from
    plan = plan_subtrees(paths, tokens, world=2, branching=3, level=2)
    shared = plan.shared_sets(["l0", "l1", "l2"])
    assert shared and all(key == "l0" for key, *_ in shared)
    assert row["bank_bytes_per_step"] > 0  # the shared level-0 blocks, reduced by BankSync as in training

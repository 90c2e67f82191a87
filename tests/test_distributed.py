"""Subtree-affine data parallelism (docs/distributed.md): the plan, the sampler, per-rank banks and their merge, and
two gloo processes under Lightning's DDP strategy that match one process exactly, without ever all-reducing the bank.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import fit_each, free_port, tiny_recipe_dict, torchrun_env
from hmlm.bank.merge import BankMergeError, merge_rank_banks, save_rank_bank
from hmlm.train.affine import SubtreePlanError, SubtreeSampler, plan_subtrees


def random_paths(rng: np.random.Generator, n: int, k: int, levels: int) -> np.ndarray:
    leaf = rng.integers(0, k ** levels, size=n)
    return np.stack([leaf // k ** (levels - 1 - lvl) for lvl in range(levels)], axis=1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(2, 4), levels=st.integers(1, 3), world=st.integers(1, 5),
       forced=st.booleans())
def test_plan_owns_every_block_once_below_the_assignment_level(seed, k, levels, world, forced):
    rng = np.random.default_rng(seed)
    paths = random_paths(rng, 60, k, levels)
    tokens = rng.integers(1, 100, size=60)
    try:
        plan = plan_subtrees(paths, tokens, world=world, branching=k, level=levels if forced else 0)
    except SubtreePlanError as exc:
        assert len(np.unique(paths[:, -1])) < world and "non-empty subtrees" in str(exc)
        return
    a = plan.level - 1
    assert np.array_equal(plan.seq_rank, plan.owner[paths[:, a]])
    assert plan.rank_tokens.sum() == tokens.sum() and (plan.rank_tokens > 0).all()
    # LPT bound: no rank exceeds the mean by more than one subtree
    sub = np.bincount(paths[:, a], weights=tokens, minlength=k ** plan.level)
    assert plan.rank_tokens.max() <= tokens.sum() / world + sub.max()
    keys = [f"l{lvl}" for lvl in range(levels)] + ["generic"]
    for key in keys:
        mem = plan.members(key)
        assert mem.any(axis=1).all(), key  # every block is held somewhere, so a merge is complete
        if key != "generic" and int(key[1:]) >= a:
            assert (mem.sum(1) == 1).all(), key
    # a sequence's blocks are all held by its rank
    held = {r: plan.held_rows(r, keys) for r in range(world)}
    for i in range(0, 60, 7):
        r = plan.seq_rank[i]
        assert all(paths[i, lvl] in held[r][f"l{lvl}"] for lvl in range(levels))
    shared = {(key, tuple(rows)) for key, _, rows in plan.shared_sets(keys)}
    assert all(key == "generic" or int(key[1:]) < a for key, _ in shared)


def test_plan_errors_name_the_fix():
    paths = np.array([[0, 0], [0, 1]])
    with pytest.raises(SubtreePlanError, match="trainer.data_parallel=replicated"):
        plan_subtrees(paths, np.array([5, 5]), world=3, branching=2)
    with pytest.raises(SubtreePlanError, match="subtree_level=3"):
        plan_subtrees(paths, np.array([5, 5]), world=1, branching=2, level=3)


def test_reference_sampler_is_the_ranks_batches_in_rank_order():
    rng = np.random.default_rng(0)
    paths = random_paths(rng, 50, 3, 2)
    plan = plan_subtrees(paths, rng.integers(1, 50, size=50), world=3, branching=3, level=1)
    b, steps = 4, 30  # more steps than a rank has sequences: crosses epochs
    ref = iter(SubtreeSampler(plan, 7, b, ranks=range(3)))
    per_rank = {r: iter(SubtreeSampler(plan, 7, b, ranks=[r])) for r in range(3)}
    ref_list = [next(ref) for _ in range(steps * 3 * b)]
    want = [next(per_rank[r]) for _ in range(steps) for r in range(3) for _ in range(b)]
    assert ref_list == want
    assert all(plan.seq_rank[i] == (j // b) % 3 for j, i in enumerate(ref_list))
    # resuming at step s continues the same stream
    resumed = iter(SubtreeSampler(plan, 7, b, ranks=range(3), start_step=11))
    assert [next(resumed) for _ in range(3 * b * 5)] == ref_list[11 * 3 * b:16 * 3 * b]


def test_restricted_stores_merge_back_and_refuse_foreign_blocks(tiny_recipe, tmp_path):
    from hmlm.model import build_anchor, build_layout, build_store

    recipe = tiny_recipe()
    layout = build_layout(recipe, build_anchor(recipe, 512))
    rng = np.random.default_rng(1)
    paths = random_paths(rng, 40, 3, 3)
    plan = plan_subtrees(paths, np.ones(40, dtype=np.int64), world=2, branching=3, level=2)
    full = build_store(recipe, layout)
    for r in range(2):
        part = build_store(recipe, layout)
        part.restrict({k: torch.from_numpy(v) for k, v in plan.held_rows(r, list(part.tensors)).items()})
        mine = torch.from_numpy(paths[plan.seq_rank == r][:3])
        part.fetch(mine)  # its own subtrees: fine
        other = torch.from_numpy(paths[plan.seq_rank != r][:1])
        with pytest.raises(ValueError, match="not held by this rank"):
            part.fetch(other)
        save_rank_bank(part, tmp_path / f"rank-{r:03d}", rank=r, world=2)
    merged = merge_rank_banks([tmp_path / "rank-000", tmp_path / "rank-001"], build_store(recipe, layout, init=False))
    for key, name, t in full.iter_blocks():
        assert torch.equal(merged.tensors[key][name], t), (key, name)
    with pytest.raises(BankMergeError, match="not ranks 0..world-1"):
        merge_rank_banks([tmp_path / "rank-001"], build_store(recipe, layout, init=False))


# ---------------------------------------------------------------------------------------------- two gloo processes
SCENARIOS = {
    # level-1 subtrees, no generic block: the bank is never communicated at all. Trained as 2 steps, then resumed
    # from the per-rank checkpoints to 4 (the first 2 steps are warmup, so the LR schedule is the same)
    "owned": {"trainer.subtree_level": 1, "memory.generic": False, "trainer.ckpt_every": 2},
    # frozen anchor (the paper's "train each subtree independently, then merge"): nothing of the anchor to reduce
    "frozen": {"trainer.subtree_level": 1, "memory.generic": False, "trainer.mode": "memory"},
    # level-2 subtrees: level-1 blocks and the generic block are shared by owner groups; clipping via the global norm
    "shared": {"trainer.subtree_level": 2, "memory.generic": True, "optim.memory.grad_clip": 0.05},
}
COMMON = {"trainer.data_parallel": "subtree", "trainer.max_steps": 4, "trainer.batch_size": 2,
          "trainer.val_every": 1000, "trainer.ckpt_every": 1000, "trainer.accelerator": "cpu"}


def _worker(rank: int, port: int, recipes: dict) -> None:
    torchrun_env(rank, 2, port)
    torch.set_num_threads(1)
    fit_each(recipes, resumed="owned")


@pytest.fixture(scope="module")
def runs(small_corpus, tmp_path_factory):
    from hmlm.config import recipe_from_dict
    from hmlm.index import ensure_index
    from hmlm.train.fit import fit

    root = tmp_path_factory.mktemp("dist")
    index = str(root / "index")
    dist_recipes, out = {}, {}
    for name, extra in SCENARIOS.items():
        kw = {**COMMON, **extra, "index.dir": index}
        dist_recipes[name] = tiny_recipe_dict(small_corpus, root / f"{name}-ddp",
                                              **{**kw, "trainer.devices": 2, "trainer.strategy": "ddp"})
        out[name] = (root / f"{name}-ddp", root / f"{name}-ref")
    from rich.console import Console

    ensure_index(recipe_from_dict(dist_recipes["owned"]), Console(quiet=True))
    torch.multiprocessing.spawn(_worker, args=(free_port(), dist_recipes), nprocs=2, join=True)
    for name, extra in SCENARIOS.items():
        # one process, the same global batch and order: the two ranks' batches back to back
        kw = {**COMMON, **extra, "index.dir": index, "trainer.subtree_ranks": 2}
        fit(recipe_from_dict(tiny_recipe_dict(small_corpus, out[name][1], **kw)), progress=False, final_eval=False)
    return out


def _rank_info(run: Path) -> list[dict]:
    return [json.loads((run / "ranks" / f"rank-{r:03d}" / "rank.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_two_gloo_ranks_equal_one_process(runs, scenario):
    from hmlm.export import load_model_dir

    ddp_dir, ref_dir = runs[scenario]
    a, b = load_model_dir(ddp_dir / "model"), load_model_dir(ref_dir / "model")
    for (name, x), y in zip(a.model.anchor.state_dict().items(), b.model.anchor.state_dict().values()):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), (name, (x - y).abs().max())
    for key, name, t in b.model.store.iter_blocks():
        other = a.model.store.tensors[key][name]
        assert torch.allclose(other, t, rtol=1e-4, atol=1e-5), (key, name, (other - t).abs().max())
    # the merged bank was trained by both ranks: each rank's own deepest blocks moved away from their init
    from safetensors.torch import load_file

    from hmlm.model import build_store

    init = build_store(a.recipe, a.model.layout)
    key = f"l{len(a.model.layout.sizes) - 1}"
    for r in range(2):
        rows = load_file(str(ddp_dir / "ranks" / f"rank-{r:03d}" / "bank" / f"{key}.safetensors"))["_rows"]
        moved = (a.model.store.tensors[key]["w3"][rows] != init.tensors[key]["w3"][rows]).flatten(1).any(1)
        assert moved.any(), f"rank {r} trained none of its blocks"
    assert all(i["steps"] == 4 for i in _rank_info(ddp_dir))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_bank_is_never_all_reduced(runs, scenario):
    ddp_dir, _ = runs[scenario]
    for info in _rank_info(ddp_dir):
        comm, steps = info["comm"], info["segment_steps"]
        # DDP's buckets carry exactly the anchor's gradients, once per step: the bank is no DDP parameter
        assert comm["anchor_bytes"] == steps * info["anchor_grad_bytes"]
        assert steps == (2 if scenario == "owned" else 4)
        if scenario in ("owned", "frozen"):
            assert comm["shared_bytes"] == 0 and comm["shared_calls"] == 0
        else:
            # only shallow (above the assignment level) and generic blocks, within their owner groups
            assert comm["shared_calls"] > 0 and set(comm["shared_keys"]) <= {"l0", "generic"}
            assert comm["norm_calls"] == steps


# ----------------------------------------------------------------------------------- two nodes of two ranks each
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(2, 4), nodes=st.integers(2, 3), per_node=st.integers(1, 3))
def test_node_local_plan_keeps_shared_blocks_inside_a_node(seed, k, nodes, per_node):
    rng = np.random.default_rng(seed)
    paths = random_paths(rng, 300, k, 3)
    world = nodes * per_node
    try:
        plan = plan_subtrees(paths, rng.integers(1, 100, size=300), world=world, branching=k, nodes=nodes)
    except SubtreePlanError:
        return  # too few non-empty subtrees for this many nodes/ranks
    assert plan.nodes == nodes and (plan.rank_tokens > 0).all()
    # some node level b: every level-b subtree lies on one node, so every block at or below it is reduced inside
    # that node (only shallower blocks and the generic block cross nodes)
    a, node = plan.level, plan.owner // per_node
    assert any(all(len(set(node[np.arange(k ** a) // k ** (a - b) == n].tolist())) == 1 for n in range(k ** b))
               for b in range(1, a + 1))
    if world % (nodes + 1):
        with pytest.raises(SubtreePlanError, match="evenly"):
            plan_subtrees(paths, np.ones(300, dtype=np.int64), world=world, branching=k, nodes=nodes + 1)


def test_node_local_plan_on_a_known_tree():
    # k=2, 3 levels, 8 equal leaves; 2 nodes x 2 ranks at level 2: each level-1 subtree on one node
    paths = np.array([[leaf // 4, leaf // 2, leaf] for leaf in range(8)])
    plan = plan_subtrees(paths, np.ones(8, dtype=np.int64), world=4, branching=2, level=2, nodes=2)
    node_of_subtree = plan.owner // 2
    assert node_of_subtree[0] == node_of_subtree[1] and node_of_subtree[2] == node_of_subtree[3]
    assert sorted(plan.owner.tolist()) == [0, 1, 2, 3]
    # without nodes, LPT may split a level-1 subtree across ranks of two nodes; with nodes, l0's groups are node-local
    for key, group, _ in plan.shared_sets(["l0", "l1", "l2"]):
        assert key == "l0" and len({r // 2 for r in group}) == 1


NODE_RUN = {"trainer.subtree_level": 2, "memory.generic": True, "optim.memory.grad_clip": 0.05}


def _node_worker(rank: int, port: int, recipe: dict) -> None:
    torchrun_env(rank, 4, port, per_node=2)  # 2 nodes x 2 processes, all on this host
    torch.set_num_threads(1)
    fit_each({"nodes": recipe})


def test_two_nodes_of_two_ranks_equal_one_process(small_corpus, tmp_path):
    from hmlm.config import recipe_from_dict
    from hmlm.export import load_model_dir
    from hmlm.train.fit import fit

    index = str(tmp_path / "index")
    kw = {**COMMON, **NODE_RUN, "index.dir": index}
    nodes = tiny_recipe_dict(small_corpus, tmp_path / "nodes", **{**kw, "trainer.devices": 2, "trainer.num_nodes": 2,
                                                                    "trainer.strategy": "ddp"})
    ref = tiny_recipe_dict(small_corpus, tmp_path / "ref", **{**kw, "trainer.subtree_ranks": 4,
                                                                "trainer.subtree_nodes": 2})
    fit(recipe_from_dict(ref), progress=False, final_eval=False)  # also builds the index
    torch.multiprocessing.spawn(_node_worker, args=(free_port(), nodes), nprocs=4, join=True)
    a, b = load_model_dir(tmp_path / "nodes" / "model"), load_model_dir(tmp_path / "ref" / "model")
    for (name, x), y in zip(a.model.anchor.state_dict().items(), b.model.anchor.state_dict().values()):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), (name, (x - y).abs().max())
    for key, name, t in b.model.store.iter_blocks():
        other = a.model.store.tensors[key][name]
        assert torch.allclose(other, t, rtol=1e-4, atol=1e-5), (key, name, (other - t).abs().max())
    infos = [json.loads((tmp_path / "nodes" / "ranks" / f"rank-{r:03d}" / "rank.json").read_text())
             for r in range(4)]
    assert all(i["plan"]["nodes"] == 2 and i["steps"] == 4 for i in infos)
    # shared level-0 blocks are reduced in node-local groups; only the generic block spans both nodes
    from hmlm.train.affine import plan_for_recipe

    plan = plan_for_recipe(recipe_from_dict(ref), index, 1)
    for key, group, _ in plan.shared_sets(["l0", "l1", "l2", "generic"]):
        assert key == "generic" or len({r // 2 for r in group}) == 1, (key, group)

"""trainer.strategy=deepspeed_stage_1|2|3 (hmlm.train.deepspeed, docs/distributed.md): the config it builds, the
refusals before training, checksummed checkpoint directories and --resume's choice among them, and two gloo
processes under the DeepSpeed strategy (stage 2 with a resume, stage 3) that
match one process of the same subtree-parallel run without any engine.

DeepSpeed runs only on CUDA through Lightning; the end-to-end runs use the test-only CPU subclass of tests/ds_cpu.py.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import fit_each, free_port, tiny_recipe_dict, torchrun_env
from hmlm.cli import main
from hmlm.config import RecipeError, recipe_from_dict
from hmlm.train.checkpoints import checkpoint_problem, resolve_resume, run_checkpoints, write_dir_sidecar
from hmlm.train.deepspeed import deepspeed_config, lightning_precision
from hmlm.train.errors import FitError


# ------------------------------------------------------------------------------------------------ config and refusals
def test_config_carries_the_recipe_into_deepspeed(tiny_recipe):
    recipe = tiny_recipe(**{"trainer.strategy": "deepspeed_stage_2", "optim.anchor.grad_clip": 0.7,
                            "trainer.batch_size": 3, "trainer.deepspeed.bucket_mb": 50})
    cfg = deepspeed_config(recipe, "32-true")
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 2 and zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 50_000_000
    assert "offload_optimizer" not in zero and "torch_autocast" not in cfg and "communication_data_type" not in cfg
    assert cfg["gradient_clipping"] == 0.7 and cfg["train_micro_batch_size_per_gpu"] == 3
    # bf16-mixed: fp32 weights + DeepSpeed's autocast (its own bf16 mode would cast the anchor the bank meets)
    assert lightning_precision("bf16-mixed") == "32-true" and lightning_precision("32-true") == "32-true"
    bf16 = deepspeed_config(recipe, "bf16-mixed")
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    fp32_reduce = deepspeed_config(tiny_recipe(**{"trainer.strategy": "deepspeed_stage_1",
                                                  "trainer.deepspeed.grad_reduce": "fp32"}), "bf16-mixed")
    assert fp32_reduce["torch_autocast"]["lower_precision_safe_modules"] == []
    assert fp32_reduce["zero_optimization"]["stage"] == 1
    offload = deepspeed_config(tiny_recipe(**{"trainer.strategy": "deepspeed_stage_3",
                                              "trainer.deepspeed.offload_optimizer": True,
                                              "trainer.deepspeed.grad_reduce": "bf16"}), "32-true")
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offload["communication_data_type"] == "bf16" and offload["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("override,key", [
    ({"trainer.strategy": "deepspeed_stage_4"}, "trainer.strategy"),
    ({"trainer.strategy": "deepspeed_stage_2", "trainer.mode": "memory"}, "trainer.mode"),
    ({"trainer.strategy": "deepspeed_stage_2", "trainer.nonfinite.skip": 2}, "trainer.nonfinite.skip"),
    ({"trainer.deepspeed.grad_reduce": "fp8"}, "trainer.deepspeed.grad_reduce"),
    ({"trainer.num_nodes": 0}, "trainer.num_nodes"),
])
def test_recipe_refuses_what_deepspeed_cannot_run(tiny_recipe, override, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        tiny_recipe(**override)


def _fit_cli(capsys, recipe_path: Path) -> tuple[int, str]:
    code = main(["fit", "--recipe", str(recipe_path)])
    out, err = capsys.readouterr()
    return code, out + err


def test_fit_refuses_without_deepspeed_or_on_cpu(capsys, small_corpus, tmp_path, monkeypatch):
    from hmlm.config import to_yaml

    recipe = recipe_from_dict(tiny_recipe_dict(small_corpus, tmp_path / "run",
                                               **{"trainer.strategy": "deepspeed_stage_2"}))
    path = tmp_path / "r.yaml"
    path.write_text(to_yaml(recipe))
    code, text = _fit_cli(capsys, path)
    # accelerator cpu: DeepSpeed runs on CUDA only; without the package, installing it comes first
    expected = "CUDA" if importlib.util.find_spec("deepspeed") is not None else "pip install deepspeed"
    assert code == 2 and "trainer.strategy" in text and expected in text and "Traceback" not in text
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    code, text = _fit_cli(capsys, path)
    assert code == 2 and "pip install deepspeed" in text and "Traceback" not in text
    assert not (tmp_path / "run").exists()  # nothing written


# -------------------------------------------------------------------------------------------- checkpoint directories
def _fake_ds_checkpoint(path: Path, step: int) -> None:
    """The layout DeepSpeed writes (latest + <tag>/mp_rank_00_model_states.pt holding Lightning's entries)."""
    (path / "checkpoint").mkdir(parents=True)
    (path / "latest").write_text("checkpoint")
    torch.save({"global_step": step, "module": {"w": torch.ones(2)}, "callbacks": {}},
               path / "checkpoint" / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"x": torch.zeros(3)}},
               path / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    write_dir_sidecar(path)


def test_checkpoint_directories_verify_and_resume_falls_back(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4):
        _fake_ds_checkpoint(ckpts / f"step-{step:06d}.ckpt", step)
    (ckpts / "bank").mkdir()  # a plain directory is no checkpoint
    assert [p.name for p in run_checkpoints(ckpts)] == ["step-000004.ckpt", "step-000002.ckpt"]
    newest = ckpts / "step-000004.ckpt"
    assert checkpoint_problem(newest) is None
    side = (ckpts / "step-000004.ckpt.sha256").read_text().splitlines()
    assert len(side) == 3 and all(line.split("  ")[1].startswith("step-000004.ckpt/") for line in side)
    point = resolve_resume(tmp_path, None, verify=True, command="hmlm fit")
    assert point.step == 4 and point.path == newest and point.ckpt["state_dict"]["w"].shape == (2,)

    shard = newest / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:-3] + b"xyz")  # flipped bytes in one rank's shard
    assert "checksum mismatch" in checkpoint_problem(newest)
    point = resolve_resume(tmp_path, None, verify=True, command="hmlm fit")
    assert point.step == 2 and any("step-000004.ckpt" in s for s in point.skipped)
    assert newest in point.supersede  # moved aside (not deleted) when the resumed run writes
    with pytest.raises(FitError, match="checksum mismatch"):
        resolve_resume(tmp_path, "step-000004.ckpt", verify=True, command="hmlm fit")

    older = ckpts / "step-000002.ckpt"
    (older / "checkpoint" / "extra.pt").write_bytes(b"0")
    assert "not listed" in checkpoint_problem(older)
    (older / "checkpoint" / "extra.pt").unlink()
    (older / "latest").unlink()
    assert older not in run_checkpoints(ckpts)  # without `latest` it is no DeepSpeed checkpoint
    (older / "latest").write_text("checkpoint")
    shutil.rmtree(older / "checkpoint")
    assert "missing" in checkpoint_problem(older)


# ------------------------------------------------------------------------------ two gloo processes under DeepSpeed
COMMON = {"trainer.data_parallel": "subtree", "trainer.subtree_level": 1, "memory.generic": False,
          "trainer.max_steps": 4, "trainer.batch_size": 2, "trainer.val_every": 1000, "trainer.ckpt_every": 1000,
          "trainer.accelerator": "cpu", "optim.anchor.grad_clip": 0.05}
# stage 2: 2 steps with checkpoints at both, then --resume to 4 (keep_last 1: one step directory stays);
# stage 3: the anchor partitioned over both ranks, gathered back for the export. (The optimizer offload is covered by
# the config test only: on the CPU accelerator DeepSpeed JIT-builds its cpu_adam op for it, minutes of C++.)
SCENARIOS = {
    "stage2": {"trainer.strategy": "deepspeed_stage_2", "trainer.ckpt_every": 1, "trainer.keep_last": 1},
    "stage3": {"trainer.strategy": "deepspeed_stage_3"},
}


def _worker(rank: int, port: int, recipes: dict) -> None:
    torchrun_env(rank, 2, port)
    torch.set_num_threads(1)
    from ds_cpu import use_cpu_deepspeed

    use_cpu_deepspeed()
    fit_each(recipes, resumed="stage2")


@pytest.fixture(scope="module")
def runs(small_corpus, tmp_path_factory):
    pytest.importorskip("deepspeed")
    from rich.console import Console

    from hmlm.index import ensure_index
    from hmlm.train.fit import fit

    root = tmp_path_factory.mktemp("ds")
    index = str(root / "index")
    recipes = {name: tiny_recipe_dict(small_corpus, root / name, **{**COMMON, **extra, "index.dir": index,
                                                                      "trainer.devices": 2})
               for name, extra in SCENARIOS.items()}
    ensure_index(recipe_from_dict(recipes["stage2"]), Console(quiet=True))
    torch.multiprocessing.spawn(_worker, args=(free_port(), recipes), nprocs=2, join=True)
    # one process, no engine: the two ranks' batches back to back (docs/distributed.md, "The order")
    fit(recipe_from_dict(tiny_recipe_dict(small_corpus, root / "ref", **{**COMMON, "index.dir": index,
                                                                          "trainer.subtree_ranks": 2})),
        progress=False, final_eval=False)
    return root


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_deepspeed_ranks_equal_one_process(runs, scenario):
    from hmlm.export import load_model_dir

    a, b = load_model_dir(runs / scenario / "model"), load_model_dir(runs / "ref" / "model")
    for (name, x), y in zip(a.model.anchor.state_dict().items(), b.model.anchor.state_dict().values()):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), (name, (x - y).abs().max())
    for key, name, t in b.model.store.iter_blocks():
        other = a.model.store.tensors[key][name]
        assert torch.allclose(other, t, rtol=1e-4, atol=1e-5), (key, name, (other - t).abs().max())
    for r in range(2):
        info = json.loads((runs / scenario / "ranks" / f"rank-{r:03d}" / "rank.json").read_text())
        assert info["steps"] == 4 and info["comm"]["shared_bytes"] == 0  # level-1 subtrees: the bank stays put


def test_deepspeed_checkpoints_are_checksummed_directories(runs):
    ckpts = runs / "stage2" / "checkpoints"
    found = run_checkpoints(ckpts)
    # keep_last 1: the newest step directory and last.ckpt; each with a sidecar that verifies
    assert [p.name for p in found] == ["last.ckpt", "step-000004.ckpt"]
    for p in found:
        assert p.is_dir() and (p / "latest").is_file() and checkpoint_problem(p) is None
    # every rank's bank state for the resumable steps was written beside them
    assert (ckpts / "bank-ranks" / "step-000004" / "rank-001.safetensors").is_file()
    assert not list(ckpts.glob(".*.tmp")) and not list(ckpts.glob(".*.old"))

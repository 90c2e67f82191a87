"""End-to-end training on CPU: losses decrease, exact resume, modes, the model directory and its loader."""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from conftest import read_metrics
from hmlm.export import ModelDirError, load_model_dir
from hmlm.train.fit import fit


def losses(out_dir):
    return {int(r["step"]): float(r["train/loss"]) for r in read_metrics(out_dir) if r.get("train/loss")}


def test_exact_resume_reproduces_uninterrupted_losses(tiny_recipe, tmp_path):
    full = tiny_recipe(**{"out_dir": str(tmp_path / "full"), "index.dir": str(tmp_path / "index")})
    fit(full, progress=False, final_eval=False)
    # interrupted run: stop at step 3 (a checkpoint), then resume to step 6 with the same recipe
    part = tiny_recipe(**{"out_dir": str(tmp_path / "part"), "index.dir": str(tmp_path / "index"),
                          "trainer.max_steps": 3})
    from lightning.pytorch.trainer.connectors import data_connector

    data_connector.warning_cache.clear()  # Lightning warns once per process: the fit above already had its turn
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fit(part, progress=False, final_eval=False)
    # Lightning's noise a user can do nothing about stays out of the output (quickstart prints no warnings)
    noise = [str(w.message)[:60] for w in seen
             if any(text in str(w.message) for text in ("LeafSpec", "ModelCheckpoint", "transfer_batch_to_device"))]
    assert not noise
    resumed = tiny_recipe(**{"out_dir": str(tmp_path / "part"), "index.dir": str(tmp_path / "index")})
    fit(resumed, resume=True, progress=False, final_eval=False)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(a) == sorted(b) and len(a) == 6
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=0, abs=1e-6), (step, a, b)
    m1 = load_model_dir(tmp_path / "full" / "model")
    m2 = load_model_dir(tmp_path / "part" / "model")
    for (k1, v1), (k2, v2) in zip(m1.model.anchor.state_dict().items(), m2.model.anchor.state_dict().items()):
        assert torch.allclose(v1, v2, atol=1e-6), k1
    for key, name, t in m1.model.store.iter_blocks():
        assert torch.allclose(t, m2.model.store.tensors[key][name], atol=1e-6)


def test_memory_mode_freezes_anchor_and_trains_bank(tiny_recipe, tmp_path):
    base = tiny_recipe(**{"trainer.mode": "anchor", "out_dir": str(tmp_path / "a"),
                          "index.dir": str(tmp_path / "index")})
    fit(base, progress=False, final_eval=False)
    mem = tiny_recipe(**{"trainer.mode": "memory", "out_dir": str(tmp_path / "m"),
                         "index.dir": str(tmp_path / "index"), "anchor.init_from": str(tmp_path / "a" / "model")})
    fit(mem, progress=False, final_eval=False)
    a = load_model_dir(tmp_path / "a" / "model")
    m = load_model_dir(tmp_path / "m" / "model")
    assert a.model.store is None and m.model.store is not None
    for (k, v1), v2 in zip(a.model.anchor.state_dict().items(), m.model.anchor.state_dict().values()):
        assert torch.equal(v1, v2), f"frozen anchor changed: {k}"
    assert any(t.abs().sum() > 0 for key, name, t in m.model.store.iter_blocks() if name == "w3")


def test_model_dir_is_self_contained_and_checked(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    loaded = load_model_dir(copy)
    assert loaded.model.store is not None
    ids = torch.tensor([loaded.tokenizer.encode("Helium is a gas.")])
    paths = loaded.route(["Helium is a gas."])
    assert paths.shape == (1, 3)
    out = loaded.model(ids, paths=paths, memory="fetched")
    assert out.shape[:2] == ids.shape
    # a corrupted file is caught by the checksum, with the file named
    bank_file = sorted((copy / "bank").iterdir())[0]
    bank_file.write_bytes(bank_file.read_bytes()[:-7] + b"corrupt")
    with pytest.raises(ModelDirError, match=bank_file.name):
        load_model_dir(copy)


def test_training_reduces_loss(tiny_model_dir):
    rows = losses(tiny_model_dir.parent)
    first, last = rows[min(rows)], rows[max(rows)]
    assert last < first


def test_in_training_knowledge_eval_logs_bucket_accuracies(tiny_recipe, tmp_path):
    recipe = tiny_recipe(**{"out_dir": str(tmp_path / "e"), "trainer.max_steps": 4, "trainer.eval_every": 2,
                            "trainer.eval_limit": 8, "trainer.eval_memory": ["fetched", "none"]})
    fit(recipe, progress=False, final_eval=False)
    logged = {k for row in read_metrics(tmp_path / "e") for k, v in row.items() if v}
    assert "eval/hmlm_atomic_number/fetched/exact_match" in logged or \
        any(k.startswith("eval/hmlm_atomic_number/fetched/") for k in logged)
    assert any("acc_bucket_" in k for k in logged)


def test_bf16_mixed_fit_clips_with_the_fused_optimizer(tiny_recipe, tmp_path):
    """bf16-mixed is what `auto` means on a GPU; Lightning's mixed-precision plugin refuses to clip torch's fused
    AdamW (it can unscale by itself), which ended every GPU fit with optim.anchor.grad_clip > 0 at its first step
    (found by the reproduction's second GPU call); CPU bf16-mixed goes through the same plugin."""
    recipe = tiny_recipe(**{"out_dir": str(tmp_path / "run"), "index.dir": str(tmp_path / "index"),
                            "trainer.precision": "bf16-mixed", "trainer.max_steps": 2, "optim.anchor.grad_clip": 0.5})
    fit(recipe, progress=False, final_eval=False)
    assert sorted(losses(tmp_path / "run")) and (tmp_path / "run" / "model" / "model.json").is_file()

"""Training schedules of the paper: generic memory on 1/(k+1) of sequences, anchor-then-co-train from an anchor
checkpoint, the generic-only control (generic_prob 1.0), and separate LR / weight decay / clipping per group."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import read_metrics
from hmlm.bank.stores import BlockStore
from hmlm.export import load_model_dir
from hmlm.model import build_model, build_store
from hmlm.train.fit import fit
from hmlm.train.module import HMLMModule
from hmlm.train.schedule import cosine_lr


@pytest.fixture(scope="module")
def shared_index(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("schedules-index") / "index"


def masks(module: HMLMModule, steps: int, batch: int, monkeypatch) -> torch.Tensor:
    """The generic masks the module would draw at steps 0..steps-1 ([steps, batch] bool)."""
    state = {"step": 0}
    monkeypatch.setattr(HMLMModule, "global_step", property(lambda self: state["step"]))
    rows = []
    for step in range(steps):
        state["step"] = step
        m = module._generic_mask(batch)
        rows.append(torch.zeros(batch, dtype=torch.bool) if m is None else m)
    return torch.stack(rows)


@pytest.mark.parametrize("mode, prob, expected", [
    ("cotrain", None, 1 / 4),      # default 1/(k+1), k = 3 in the tiny tree (paper: 1/17 with k = 16)
    ("memory", None, 1 / 4),       # frozen anchor: the generic block trains the same way
    ("scratch", 0.4, 0.4),         # explicit override
    ("cotrain", 0.0, 0.0),
])
def test_generic_sampling_rate(tiny_recipe, monkeypatch, mode, prob, expected):
    recipe = tiny_recipe(**{"trainer.mode": mode, "memory.generic_prob": prob})
    module = HMLMModule(recipe, build_model(recipe, vocab_size=512))
    drawn = masks(module, steps=1500, batch=16, monkeypatch=monkeypatch)   # 24,000 sequences
    rate = drawn.float().mean().item()
    n = drawn.numel()
    tol = 5 * (expected * (1 - expected) / n) ** 0.5 + 1e-12                # 5 binomial standard deviations
    assert abs(rate - expected) <= tol, (rate, expected)
    if 0 < expected < 1:
        # drawn per sequence, not per batch: most batches mix generic and fetched sequences
        mixed = (drawn.any(1) & ~drawn.all(1)).float().mean().item()
        assert mixed > 0.5
        # reproducible: the same step draws the same mask (exact resume)
        assert torch.equal(drawn, masks(module, steps=1500, batch=16, monkeypatch=monkeypatch))


def test_no_generic_block_means_no_generic_draws(tiny_recipe, monkeypatch):
    recipe = tiny_recipe(**{"trainer.mode": "cotrain", "memory.generic": False})
    module = HMLMModule(recipe, build_model(recipe, vocab_size=512))
    assert not masks(module, steps=50, batch=8, monkeypatch=monkeypatch).any()
    assert module.eval_modes == ("fetched", "none")


def test_generic_only_control_never_updates_path_blocks(tiny_recipe, tmp_path, shared_index):
    """memory.generic_prob: 1.0 is the generic-only model: the generic block trains, no path block ever moves."""
    recipe = tiny_recipe(**{"trainer.mode": "cotrain", "memory.generic_prob": 1.0, "trainer.max_steps": 4,
                            "index.dir": str(shared_index), "out_dir": str(tmp_path / "generic")})
    result = fit(recipe, progress=False, final_eval=False)
    trained = load_model_dir(result["model_dir"]).model.store
    fresh = build_store(recipe, trained.layout)   # the same seed gives the bank as it was before training
    assert isinstance(fresh, BlockStore)
    for key, name, t in trained.iter_blocks():
        init = fresh.tensors[key][name]
        if key == "generic":
            if name == "w3":
                assert not torch.equal(t, init), "generic block did not train"
        else:
            assert torch.equal(t, init), f"path block {key}.{name} changed although generic_prob is 1.0"


def test_anchor_then_cotrain_from_checkpoint(tiny_recipe, tmp_path, shared_index):
    """A1-style anchor pretraining, then co-training from its Lightning checkpoint and from its model directory."""
    common = {"index.dir": str(shared_index)}
    anchor_run = tiny_recipe(**common, **{"trainer.mode": "anchor", "out_dir": str(tmp_path / "a1"),
                                          "trainer.max_steps": 10, "trainer.ckpt_every": 10})   # last.ckpt = end
    fit(anchor_run, progress=False, final_eval=False)
    a1 = load_model_dir(tmp_path / "a1" / "model").model.anchor.state_dict()

    # from the .ckpt file with a zero anchor LR: the anchor stays exactly the checkpoint's, the memory trains
    frozen_lr = tiny_recipe(**common, **{"trainer.mode": "cotrain", "out_dir": str(tmp_path / "ck"),
                                         "trainer.max_steps": 2, "optim.anchor.lr": 0.0, "optim.anchor.min_lr": 0.0,
                                         "anchor.init_from": str(tmp_path / "a1" / "checkpoints" / "last.ckpt")})
    fit(frozen_lr, progress=False, final_eval=False)
    got = load_model_dir(tmp_path / "ck" / "model").model
    for k, v in got.anchor.state_dict().items():
        assert torch.equal(v, a1[k]), k
    assert any(t.any() for _, name, t in got.store.iter_blocks() if name == "w3")

    # from the model directory: co-training starts where pretraining ended, far below a fresh start
    cotrain = tiny_recipe(**common, **{"trainer.mode": "cotrain", "out_dir": str(tmp_path / "a2"),
                                       "trainer.max_steps": 2, "anchor.init_from": str(tmp_path / "a1" / "model")})
    scratch = tiny_recipe(**common, **{"trainer.mode": "scratch", "out_dir": str(tmp_path / "a4"),
                                       "trainer.max_steps": 2})
    fit(cotrain, progress=False, final_eval=False)
    fit(scratch, progress=False, final_eval=False)
    first = {name: min((int(r["step"]), float(r["train/loss"])) for r in read_metrics(tmp_path / name)
                       if r.get("train/loss"))[1] for name in ("a1", "a2", "a4")}
    assert first["a2"] < first["a4"] - 0.1, first


def test_missing_anchor_checkpoint_is_a_clear_error(tiny_recipe, tmp_path, shared_index):
    from hmlm.config import RecipeError

    recipe = tiny_recipe(**{"index.dir": str(shared_index), "trainer.mode": "cotrain",
                            "out_dir": str(tmp_path / "x"), "anchor.init_from": str(tmp_path / "nope.ckpt")})
    with pytest.raises(RecipeError, match="anchor.init_from.*nope.ckpt"):
        fit(recipe, progress=False, final_eval=False)


def test_per_group_lr_weight_decay_and_clipping(tiny_recipe, tmp_path, shared_index, monkeypatch):
    """optim.anchor and optim.memory are separate declarative groups: each schedule, weight decay and clip is used."""
    seen: list[dict] = []
    original = BlockStore.step

    def spy(self, **kwargs):
        seen.append(kwargs)
        return original(self, **kwargs)

    monkeypatch.setattr(BlockStore, "step", spy)
    recipe = tiny_recipe(**{
        "index.dir": str(shared_index), "out_dir": str(tmp_path / "groups"), "trainer.mode": "cotrain",
        "trainer.max_steps": 5,
        "optim.anchor": {"lr": 2e-3, "min_lr": 1e-4, "warmup_steps": 2, "weight_decay": 0.05, "grad_clip": 0.7},
        "optim.memory": {"lr": 5e-3, "min_lr": 5e-4, "warmup_steps": 1, "weight_decay": 1e-3, "grad_clip": 0.25}})
    fit(recipe, progress=False, final_eval=False)
    assert len(seen) == 5
    for step, kw in enumerate(seen):
        assert kw["lr"] == pytest.approx(cosine_lr(step, recipe.optim.memory, 5))
        assert (kw["weight_decay"], kw["grad_clip"]) == (1e-3, 0.25)
    rows = [r for r in read_metrics(tmp_path / "groups") if r.get("lr/anchor")]
    assert len(rows) == 5
    for r in rows:
        step = int(r["step"])      # the row of step s holds the LR used for step s
        assert float(r["lr/anchor"]) == pytest.approx(cosine_lr(step, recipe.optim.anchor, 5), rel=1e-5)
        assert float(r["lr/memory"]) == pytest.approx(cosine_lr(step, recipe.optim.memory, 5), rel=1e-5)

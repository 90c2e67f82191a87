"""Crash consistency of the bank on every tier: a checkpoint captures the bank as it was at that step although the
disk tier is updated in place; `--resume` after kill -9 (during training, during a write-back) reproduces the
uninterrupted run exactly; torn or foreign bank files are refused by checksum."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import read_metrics, tiny_recipe_dict
from hmlm.bank.layout import BankLayout
from hmlm.bank.levelfile import BankFileError, undo_epochs
from hmlm.bank.stores import TieredStore
from hmlm.memories.ffn import FFNMemory
from hmlm.protocols import AnchorShape

K = 3
SHAPE = AnchorShape(n_layers=1, d_model=8, n_heads=1, head_dim=8, ffn_dim=16)
TIERS = ["host", "disk", "disk"]


def store(tmp, init=True, **kw) -> TieredStore:
    layout = BankLayout(FFNMemory(), SHAPE, (2, 2, 1), K, (0,))
    return TieredStore(layout, seed=1, tiers=TIERS, disk_dir=tmp / "bank", init=init, **kw)


def train(s: TieredStore, steps: range) -> None:
    for i in steps:
        g = torch.Generator().manual_seed(i)
        paths = torch.stack([torch.randint(0, K ** (lvl + 1), (4,), generator=g) for lvl in range(3)], 1)
        out = s.fetch(paths, grad=True)
        sum((t * torch.randn(t.shape, generator=g)).sum() for t in out.values()).backward()
        s.step(lr=0.05, weight_decay=0.1)


def checkpointed(tmp) -> dict:
    """Two steps, a checkpoint at step 2, the process gone; returns the checkpoint's manifest."""
    a = store(tmp)
    train(a, range(2))
    manifest = a.save_checkpoint(tmp / "ckpt" / "step-000002", 2)
    a.close()
    return manifest


def flip(path: Path, offset: int, mask: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= mask
    path.write_bytes(bytes(raw))


def assert_restores(tmp, step: int, manifest: dict, want: dict) -> TieredStore:
    """A fresh store (the process died) reopens the disk files, rolls them back to `step` and holds `want`."""
    b = store(tmp, init=False)
    b.load_checkpoint(tmp / "ckpt" / f"step-{step:06d}", manifest)
    for key, value in want.items():
        assert torch.equal(b.state_dict()[key], value), key
    return b


def test_checkpoint_restores_the_bank_of_its_step(tmp_path):
    a = store(tmp_path)
    train(a, range(3))
    manifest = a.save_checkpoint(tmp_path / "ckpt" / "step-000003", 3)
    at_3 = a.state_dict()
    train(a, range(3, 5))
    a.save_checkpoint(tmp_path / "ckpt" / "step-000005", 5)
    at_5 = a.state_dict()
    train(a, range(5, 7))   # in-place writes after the last checkpoint: undo logs of epochs 3 and 5
    a.flush()
    assert undo_epochs(tmp_path / "bank", "l1") == [3, 5]
    a.close()
    b = assert_restores(tmp_path, 3, manifest, at_3)
    # training on from the restored checkpoint repeats the original steps 3 and 4 exactly
    train(b, range(3, 5))
    for key, value in at_5.items():
        assert torch.equal(b.state_dict()[key], value), key
    b.close()


def test_torn_undo_entry_is_skipped(tmp_path):
    a = store(tmp_path)
    train(a, range(2))
    manifest = a.save_checkpoint(tmp_path / "ckpt" / "step-000002", 2)
    at_2 = a.state_dict()
    train(a, range(2, 4))
    a.flush()
    a.close()
    log = tmp_path / "bank" / "l2.undo-000000002"
    data = log.read_bytes()
    stride = 4096 + store(tmp_path / "other").format_of("l2").stride
    # a torn tail (half an entry, as when the process dies while appending it) ends the log; the intact entries
    # before it restore step 2
    log.write_bytes(data + data[:stride // 2])
    assert_restores(tmp_path, 2, manifest, at_2).close()


def test_corrupt_or_foreign_disk_file_is_refused(tmp_path):
    manifest = checkpointed(tmp_path)
    level = tmp_path / "bank" / "l2.level"
    flip(level, 4096 + 10, 0xFF)    # row 0's values
    b = store(tmp_path, init=False)
    b.load_checkpoint(tmp_path / "ckpt" / "step-000002", manifest)
    with pytest.raises(BankFileError, match="l2.level.*checksum"):
        b.fetch(torch.zeros((1, 3), dtype=torch.long))
    b.close()
    # a working file written by another run (new file id) is not the one the checkpoint was taken of
    other = store(tmp_path / "elsewhere").to_compute("cpu")
    other.close()
    os.replace(tmp_path / "elsewhere" / "bank" / "l2.level", level)
    c = store(tmp_path, init=False)
    with pytest.raises(BankFileError, match="file id"):
        c.load_checkpoint(tmp_path / "ckpt" / "step-000002", manifest)
    c.close()


def test_torn_checkpoint_copy_is_refused(tmp_path):
    manifest = checkpointed(tmp_path)
    flip(tmp_path / "ckpt" / "step-000002" / "l0.level", 4096 + 8, 0x01)   # the host level's copy, row 0
    b = store(tmp_path, init=False)
    with pytest.raises(BankFileError, match="l0.level.*checksum"):
        b.load_checkpoint(tmp_path / "ckpt" / "step-000002", manifest)
    b.close()


# ---------------------------------------------------------------------------------------------------- kill -9
DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    from hmlm.config import recipe_from_dict
    from hmlm.train.fit import fit
    recipe, mode, at = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    if mode == "step":
        from hmlm.bank import stores
        real, calls = stores.TieredStore.step, [0]
        def step(self, **kw):
            calls[0] += 1
            if calls[0] == at:          # in the middle of training step `at` (after its forward and backward)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, **kw)
        stores.TieredStore.step = step
    else:
        from hmlm.bank import blockio
        real, calls = blockio.ThreadPoolBlockIO.write_rows, [0]
        def write_rows(self, rows, src, nbytes):
            if self.path.name.endswith(".level") and "checkpoints" not in str(self.path):
                calls[0] += 1
                if calls[0] == at:      # half of a write-back's rows are on disk, the rest never will be
                    real(self, rows[: max(1, len(rows) // 2)], src, nbytes)
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(self, rows, src, nbytes)
        blockio.ThreadPoolBlockIO.write_rows = write_rows
    fit(recipe_from_dict(recipe), progress=False, final_eval=False)
""")


def losses(out_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in read_metrics(out_dir) if r.get("train/loss")}


@pytest.fixture(scope="module")
def uninterrupted(small_corpus, tmp_path_factory):
    from hmlm.config import recipe_from_dict
    from hmlm.export import load_model_dir
    from hmlm.train.fit import fit

    root = tmp_path_factory.mktemp("crash")
    recipe = recipe_from_dict(crash_recipe(small_corpus, root, "full"))
    fit(recipe, progress=False, final_eval=False)
    return root, losses(root / "full"), load_model_dir(root / "full" / "model")


def crash_recipe(corpus: Path, root: Path, name: str) -> dict:
    return tiny_recipe_dict(corpus, root / name, **{"index.dir": str(root / "index"), "trainer.max_steps": 6,
                                                    "trainer.ckpt_every": 2, "trainer.val_every": 100,
                                                    "memory.tiers": TIERS, "memory.io_threads": 2})


# ("step", 5): killed in training step 5, after the checkpoint of step 4. ("writeback", 9): the 9th write of the disk
# levels (2 at initialisation, then 2 per step) is step 4's level-2 write-back, after the checkpoint of step 2: half of
# its rows are overwritten in place (their records already in the undo log), the others never will be
@pytest.mark.parametrize("mode,at", [("step", 5), ("writeback", 9)])
def test_kill_9_then_resume_equals_the_uninterrupted_run(uninterrupted, small_corpus, mode, at):
    from hmlm.config import recipe_from_dict
    from hmlm.export import load_model_dir
    from hmlm.train.fit import fit

    root, full_losses, full_model = uninterrupted
    name = f"killed-{mode}"
    recipe = crash_recipe(small_corpus, root, name)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(recipe), mode, str(at)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (root / name / "checkpoints" / "last.ckpt").is_file()
    fit(recipe_from_dict(recipe), resume=True, progress=False, final_eval=False)
    got = losses(root / name)   # the killed segment's steps, then the resumed one's (from the last checkpoint)
    assert sorted(got) == sorted(full_losses) and len(got) == 6, (got, full_losses)
    assert all(got[s] == pytest.approx(full_losses[s], rel=0, abs=1e-6) for s in got), (got, full_losses)
    model = load_model_dir(root / name / "model")
    for key in full_model.model.store.keys():
        assert torch.equal(model.model.store.read_rows(key).params, full_model.model.store.read_rows(key).params), key

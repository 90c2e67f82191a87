"""Bad inputs and faults against `hmlm fit` (issue 8, "never lose a run").

Every refusal is checked the same way (`refused`): exit code 2, one `error:` message without a traceback that names
the file and the key, and not one byte of the run directory changed (every file hashed before and after). The rows
of the issue are marked in the test names' comments. The session's tiny run (conftest.tiny_model_dir) is copied per test.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_recipe_dict
from hmlm.cli import main

STEPS = 20  # the session's tiny run (conftest.tiny_model_dir): checkpoints every 3 steps, the newest 3 kept
NEWEST = "step-000018.ckpt"  # = last.ckpt


@dataclass
class Case:
    dir: Path      # the run directory (a copy of the trained one)
    recipe: Path   # its recipe file
    corpus: Path

    def write_recipe(self, **overrides) -> Path:
        d = tiny_recipe_dict(self.corpus, self.dir, **{"trainer.max_steps": STEPS, **overrides})
        self.recipe.write_text(yaml.safe_dump(d), encoding="utf-8")
        return self.recipe


@pytest.fixture
def case(tiny_model_dir, tmp_path, small_corpus) -> Case:
    c = Case(tmp_path / "run", tmp_path / "recipe.yaml", small_corpus)
    shutil.copytree(tiny_model_dir.parent, c.dir)
    c.write_recipe()
    return c


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    import hmlm.cli

    monkeypatch.setattr(hmlm.cli.console, "width", 10_000)  # rich would break long paths inside a word


def snapshot(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def fit_cli(capsys, *argv) -> tuple[int, str]:
    code = main(["fit", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, " ".join((out + err).split())  # rich wraps long lines: compare on normalised whitespace


def refused(capsys, case: Case, *args, names: tuple[str, ...]) -> str:
    """`hmlm fit --recipe <case> args` exits 2 with one message naming every string in `names`; nothing changed."""
    before = snapshot(case.dir)
    code, text = fit_cli(capsys, "--recipe", case.recipe, *args)
    assert code == 2, text
    assert "Traceback" not in text and text.count("error:") == 1, text
    message = text[text.index("error:"):]
    for name in names:
        assert str(name) in message, (name, message)
    assert_unchanged(before, snapshot(case.dir))
    return message


LOCK_FILES = (".hmlm.lock", ".index.lock")  # created empty by the first fit that locks a directory


def assert_unchanged(before: dict[str, str], after: dict[str, str]) -> None:
    changed = [f for f, h in before.items() if after.get(f) != h]
    new = [f for f in after if f not in before and Path(f).name not in LOCK_FILES]
    assert not changed and not new, f"a refused fit changed {changed} and added {new}"


def trained_ok(capsys, case: Case, *args) -> str:
    code, text = fit_cli(capsys, "--recipe", case.recipe, *args)
    assert code == 0, text
    return text


# ----------------------------------------------------------------------------- row 1: an existing run is never lost
def test_fresh_fit_over_a_run_refuses_without_overwrite(capsys, case):
    message = refused(capsys, case, names=(case.dir, "`out_dir`", "--resume", "--overwrite", case.recipe))
    assert "previous run" in message and "last.ckpt" in message


@pytest.mark.parametrize("override, key", [
    ("trainer.accelerator=gpu", "trainer.accelerator"),      # no CUDA here (forced below)
    ("trainer.max_steps=-5", "trainer.max_steps"),
    ("trainer.max_steps=0", "trainer.max_steps"),            # row 4
    ("trainer.max_steps=-1", "trainer.max_steps"),           # row 4: used to train for ever
    ("optim.anchor.lr=-1", "optim.anchor.lr"),
    ("optim.memory.min_lr=1", "optim.memory.min_lr"),
    ("optim.anchor.warmup_steps=-3", "optim.anchor.warmup_steps"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.ckpt_every=0", "trainer.ckpt_every"),
    ("trainer.val_every=0", "trainer.val_every"),
    ("trainer.keep_last=-1", "trainer.keep_last"),
    ("trainer.nonfinite.skip=-1", "trainer.nonfinite.skip"),
    ("trainer.devices=0", "trainer.devices"),
    ("trainer.accelerator=quantum", "trainer.accelerator"),  # row 8
    ("trainer.precision=fp7", "trainer.precision"),          # row 8
    ("anchor.options.preset=huge", "anchor.options"),        # row 8: the openlm anchor's own options
    ("anchor.options.n_layer=3", "anchor.options.n_layer"),  # known keys listed
    ("anchor.preset=huge", "anchor.options"),                # the older key is read as anchor.options.preset
    ("memory.type=fnn", "memory.type"),                      # row 8: unknown plugins name file and key
    ("memory.store=disk", "memory.store"),
    ("anchor.name=gpt5", "anchor.name"),
    ("index.router.name=kmeans", "index.router.name"),
    ("index.embedder.name=bert", "index.embedder.name"),
    ("memory.options.knn=4", "memory.options"),              # ffn declares no options
    ("index.router.options.candidates=8", "index.router.options"),
])
def test_bad_values_change_nothing_even_with_overwrite(capsys, case, monkeypatch, override, key):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # the older key is read, with a warning that names the new one
    legacy = override.startswith("anchor.preset=")
    with pytest.warns(FutureWarning, match="anchor.options.preset") if legacy else contextlib.nullcontext():
        refused(capsys, case, "--overwrite", override, names=(case.recipe, f"`{key}`"))


def test_bad_devices_for_lightning_are_one_message(capsys, case):
    # accepted by the schema, refused by Lightning's own checks when the Trainer is built: still one exit-2 line
    refused(capsys, case, "--overwrite", "trainer.strategy=warp-drive",
            names=(case.recipe, "`trainer.strategy`", "`trainer.accelerator`"))


def test_second_fit_on_a_running_out_dir_refuses(capsys, case):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from hmlm.utils import FileLock
            lock = FileLock({str(case.dir / '.hmlm.lock')!r})
            assert lock.acquire()
            lock.write({{"command": "hmlm fit"}})
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(case.dir)
        for args in ((), ("--resume",), ("--overwrite",)):
            code, text = fit_cli(capsys, "--recipe", case.recipe, *args)
            assert code == 2 and "in use by a running fit" in text and f"pid {holder.pid}" in text, text
            assert "`out_dir`" in text and str(case.dir) in text
        assert_unchanged(before, snapshot(case.dir))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_index_rebuild_refuses_while_a_fit_reads_it(capsys, case):
    from hmlm.utils import FileLock

    reader = FileLock(case.dir / ".index.lock")  # what a running fit holds on its index
    assert reader.acquire(shared=True)
    try:
        before = snapshot(case.dir)
        code = main(["index", "--recipe", str(case.recipe), "--rebuild"])
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2 and "in use by another hmlm process" in err and str(case.dir / "index") in err, err
        assert_unchanged(before, snapshot(case.dir))
    finally:
        reader.release()


def test_bad_index_shard_changes_nothing(capsys, case):  # row 1 (truncated shard) and row 5 (flipped bits)
    shard = sorted((case.dir / "index" / "shards").glob("train-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    refused(capsys, case, "--overwrite", names=(shard, "checksum mismatch", "--rebuild"))
    refused(capsys, case, "--resume", names=(shard, "checksum mismatch"))
    shard.write_bytes(bytes(data[: len(data) // 3]))
    refused(capsys, case, "--overwrite", names=(shard,))


def test_index_without_checksums_or_with_an_unlisted_shard_is_refused(capsys, case):  # row 5
    meta_path = case.dir / "index" / "index.json"
    meta = json.loads(meta_path.read_text())
    extra = case.dir / "index" / "shards" / "train-00099.safetensors"
    shutil.copy(case.dir / "index" / "shards" / meta["shards"]["train"][0], extra)
    refused(capsys, case, "--resume", names=(extra, "not covered", "checksums"))
    extra.unlink()
    meta.pop("checksums")
    meta_path.write_text(json.dumps(meta))
    refused(capsys, case, "--resume", names=(meta_path, "`checksums`", "--no-verify"))


def test_out_dir_that_is_a_file_and_unreadable_init_from(capsys, case, tmp_path):  # row 8
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    refused(capsys, case, f"out_dir={a_file}", names=(case.recipe, "`out_dir`", a_file))
    refused(capsys, case, f"index.dir={a_file}", "--resume", names=(case.recipe, "`index.dir`", a_file))
    garbage = tmp_path / "anchor.ckpt"
    garbage.write_bytes(os.urandom(256))
    garbage.chmod(0)  # unreadable for a normal user; root reads it, and it is no checkpoint either way
    refused(capsys, case, "--overwrite", f"anchor.init_from={garbage}",
            names=(case.recipe, "`anchor.init_from`", garbage))
    refused(capsys, case, "--overwrite", f"anchor.init_from={tmp_path / 'missing'}",
            names=(case.recipe, "`anchor.init_from`", "does not exist"))


# ----------------------------------------------------------------------------- row 2: non-finite loss
def test_nan_loss_stops_with_exit_2_and_keeps_the_previous_run(capsys, case):
    message = refused(capsys, case, "--overwrite", "optim.anchor.lr=1e6", "optim.memory.lr=1e6",
                      names=(case.recipe, "training stopped: a non-finite", "optim.anchor.lr",
                             "trainer.nonfinite.skip", "no model was exported"))
    assert re.search(r"non-finite (loss|value in \S+) at step \d", message), message
    assert "NaN" not in (case.dir / "fit_result.json").read_text()
    assert "no checkpoint of this run was written" in message


def test_a_bad_batch_is_skipped_and_the_stream_stays_resumable(capsys, case, monkeypatch):
    """trainer.nonfinite.skip: a batch whose loss is NaN is dropped before any optimizer sees it; the skip is
    checkpointed so a resumed stream starts after the batches already used. Also: trainer.keep_last bounds the
    step checkpoints kept (row 4)."""
    import hmlm.train.step as step_module

    original = step_module.lm_nll  # the loss of the training step fit shares with the bench (TrainStep)
    calls = {"train": 0}

    def poisoned(*args, **kwargs):
        calls["train"] += 1
        out = original(*args, **kwargs)
        return out * float("nan") if calls["train"] == 2 else out  # the second training batch (step 1)

    monkeypatch.setattr(step_module, "lm_nll", poisoned)
    case.write_recipe(**{"trainer.nonfinite.skip": 1, "trainer.keep_last": 1, "trainer.ckpt_every": 1,
                         "trainer.max_steps": 3})
    text = trained_ok(capsys, case, "--overwrite")
    assert "batch skipped" in text
    result = json.loads((case.dir / "fit_result.json").read_text())
    assert result["steps"] == 3 and result["skipped_nonfinite_steps"] == [1]
    ckpts = sorted(p.name for p in (case.dir / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step-000003.ckpt"]  # keep_last=1 (+ last.ckpt)
    assert not list(case.dir.glob(".previous-*"))  # --overwrite: the old run went once the new one had a checkpoint
    ckpt = torch.load(case.dir / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)
    assert ckpt["callbacks"]["NonFiniteGuard"]["skipped"] == [1]
    from hmlm.export import load_model_dir

    loaded = load_model_dir(case.dir / "model")
    assert all(torch.isfinite(p).all() for p in loaded.model.anchor.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks that the guard never syncs the host")
def test_guard_adds_no_host_sync_per_step_on_cuda(tiny_recipe):
    """trainer.nonfinite.skip=0: the per-step hooks only enqueue device work (any device->host sync raises here)."""
    from types import SimpleNamespace

    from hmlm.model import build_model
    from hmlm.train.guard import NonFiniteGuard

    model = build_model(tiny_recipe(), 512).cuda()
    model.store.to_compute("cuda")
    guard = NonFiniteGuard(skip=0, check_every=10, source="test")
    ids = torch.randint(0, 512, (4, 63), device="cuda")
    paths = torch.tensor([[0, 1, 2]] * 4, device="cuda")
    module = SimpleNamespace(model=model, device=torch.device("cuda"))
    for step in range(3):
        trainer = SimpleNamespace(global_step=step)
        loss = model(ids, paths=paths, memory="fetched", grad_memory=True).float().logsumexp(-1).mean()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            guard.on_before_backward(trainer, module, loss)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        loss.backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            guard.on_after_backward(trainer, module)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        model.store.discard_fetched()
    assert int(guard._first_bad) == -1


def test_guard_names_the_first_nonfinite_step():
    """skip=0: losses are folded on the device each step; the check (log step, checkpoint, end) names the first bad."""
    from types import SimpleNamespace

    from hmlm.train.errors import NonFiniteError
    from hmlm.train.guard import NonFiniteGuard

    guard = NonFiniteGuard(skip=0, check_every=10, source="r.yaml")
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)
    for step, loss in enumerate([2.0, float("nan"), 1.5, float("inf")]):
        trainer = SimpleNamespace(global_step=step, strategy=strategy, checkpoint_callback=None)
        guard.on_before_backward(trainer, None, torch.tensor(loss))
    with pytest.raises(NonFiniteError, match=r"r\.yaml: training stopped: a non-finite loss at step 1\b"):
        guard.check(trainer, None, weights=False)


def test_nonfinite_weights_are_found_by_name():
    from types import SimpleNamespace

    from hmlm.train.guard import first_nonfinite_weight

    anchor = torch.nn.Linear(3, 2)
    model = SimpleNamespace(anchor=anchor, store=None)
    assert first_nonfinite_weight(model) is None
    with torch.no_grad():
        anchor.bias[1] = float("inf")
    assert first_nonfinite_weight(model) == "anchor.bias"


# ----------------------------------------------------------------------------- rows 3 and 6: checkpoints
def flip(path: Path, at: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_checkpoint_is_refused_and_the_advice_works(capsys, case):
    last = case.dir / "checkpoints" / "last.ckpt"
    flip(last)
    message = refused(capsys, case, "--resume", "last.ckpt", names=(last, "checksum mismatch", NEWEST))
    advice = message[message.index("`hmlm fit"):].split("`")[1]
    assert advice == f"hmlm fit --recipe {case.recipe} --resume {NEWEST}"
    corrupt = last.read_bytes()
    code, text = fit_cli(capsys, *advice.split()[2:], "trainer.max_steps=19")
    assert code == 0, text
    assert "resuming from" in text and NEWEST in text
    assert json.loads((case.dir / "fit_result.json").read_text())["steps"] == 19
    kept = list((case.dir / "checkpoints").glob(".superseded-*/last.ckpt"))
    assert len(kept) == 1 and kept[0].read_bytes() == corrupt  # moved aside, not overwritten


def test_resume_falls_back_to_the_newest_valid_checkpoint_after_a_killed_run(capsys, case):
    """A kill -9 at a bad moment: last.ckpt corrupt, a stale lock, half-written temp files. --resume repairs and
    says what it did."""
    flip(case.dir / "checkpoints" / "last.ckpt")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (case.dir / ".hmlm.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": "h", "started": "t"}))
    (case.dir / ".model.abc123.tmp").mkdir()
    (case.dir / ".model.abc123.tmp" / "anchor.safetensors").write_bytes(b"partial")
    (case.dir / "index").rename(case.dir / ".index.old")  # killed in the middle of an index replace
    (case.dir / ".index.xyz789.tmp").mkdir()
    (case.dir / "checkpoints" / ".step-000021.ckpt.q1w2e3.tmp").write_bytes(b"partial")
    text = trained_ok(capsys, case, "--resume", "trainer.max_steps=19")
    assert "taking over a stale lock" in text and f"pid {int(dead.stdout)}" in text
    assert "last.ckpt: checksum mismatch" in text and f"{NEWEST} (step 18)" in text
    assert "restored" in text and ".index.old" in text
    leftovers = [p.name for p in case.dir.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert leftovers == []
    assert (case.dir / ".hmlm.lock").read_text() == ""  # released cleanly


def test_a_killed_overwrite_is_undone_by_the_next_fit(capsys, case):
    """kill -9 after --overwrite moved the old run aside and before the new run wrote a checkpoint: the next fit on the
    directory puts the old run back (and then, being a fresh fit over a run, refuses)."""
    original = snapshot(case.dir)
    aside = case.dir / ".previous-20250101-000000"
    aside.mkdir()
    for entry in ("checkpoints", "logs", "model", "fit_result.json", "recipe.yaml"):
        (case.dir / entry).rename(aside / entry)
    (case.dir / "logs").mkdir()
    (case.dir / "logs" / "metrics.csv").write_text("step,train/loss\n0,6.2\n")  # the killed run's partial log
    (case.dir / ".hmlm.lock").write_text(json.dumps({"pid": 999_999_999, "host": "h", "started": "t",
                                                     "previous": aside.name, "phase": "moved"}))
    code, text = fit_cli(capsys, "--recipe", case.recipe)
    assert code == 2 and "moved the run it replaced back" in text and "holds a previous run" in text, text
    assert snapshot(case.dir) == original


def test_overwrite_with_new_data_settings_sets_the_runs_own_index_aside(capsys, case):
    """--overwrite with a recipe whose data/index settings changed (the quickstart after an update): the index inside
    the run directory was the old run's; it goes aside with the old run, a new one is built, and the old one is
    deleted with the old run once the new run has a checkpoint."""
    from hmlm.config import load_recipe
    from hmlm.index import fingerprint

    old = json.loads((case.dir / "index" / "index.json").read_text())
    recipe = case.write_recipe(**{"data.seq_len": 32, "trainer.max_steps": 3})
    text = trained_ok(capsys, case, "--overwrite")
    assert "was built with other data/index settings" in text and "set aside with the previous run" in text
    new = json.loads((case.dir / "index" / "index.json").read_text())
    assert new["fingerprint"] == fingerprint(load_recipe(recipe)) != old["fingerprint"] and new["seq_len"] == 32
    assert not list(case.dir.glob(".previous-*"))


def test_a_failed_overwrite_brings_the_old_run_back_with_its_index(capsys, case, monkeypatch):
    import hmlm.train.fit

    original = snapshot(case.dir)
    case.write_recipe(**{"data.seq_len": 32})

    def fail(*args, **kwargs):
        raise RuntimeError("the new run dies before its first checkpoint")

    monkeypatch.setattr(hmlm.train.fit, "_train", fail)
    with pytest.raises(RuntimeError, match="dies before"):
        main(["fit", "--recipe", str(case.recipe), "--overwrite"])
    assert "the previous run is back" in capsys.readouterr().out.replace("\n", " ")
    after = snapshot(case.dir)
    assert_unchanged(original, after)
    assert not list(case.dir.glob(".previous-*"))


def test_checkpoint_from_another_recipe_is_refused(capsys, case):  # row 8
    refused(capsys, case, "--resume", "anchor.options.d_model=64",
            names=(case.dir / "checkpoints" / "last.ckpt", case.recipe, "`anchor.options.d_model`"))
    refused(capsys, case, "--resume", "memory.sizes=[8,4,4]", names=("`memory.sizes`",))


def test_every_checkpoint_corrupt_or_unverifiable(capsys, case):
    for ckpt in (case.dir / "checkpoints").glob("step-*.ckpt"):
        flip(ckpt)
    (case.dir / "checkpoints" / "last.ckpt.sha256").unlink()
    message = refused(capsys, case, "--resume", names=("no checkpoint", "can be used", "--overwrite",
                                                       "no checksum file", "--no-verify"))
    assert "step-000012.ckpt: checksum mismatch" in message


def test_resolve_resume_rules(case):
    from hmlm.train.checkpoints import resolve_resume
    from hmlm.train.errors import FitError

    ckpts = case.dir / "checkpoints"
    point = resolve_resume(case.dir, None, verify=True, command="c")
    assert point.path.name == "last.ckpt" and point.step == 18 and point.supersede == []
    point = resolve_resume(case.dir, "step-000012.ckpt", verify=True, command="c")
    assert point.step == 12 and sorted(p.name for p in point.supersede) == ["last.ckpt", "step-000015.ckpt", NEWEST]
    (ckpts / "last.ckpt.sha256").unlink()  # a checkpoint from before checksums: only --no-verify trusts it
    with pytest.raises(FitError, match="no checksum file"):
        resolve_resume(case.dir, "last.ckpt", verify=True, command="c")
    assert resolve_resume(case.dir, "last.ckpt", verify=False, command="c").step == 18
    with pytest.raises(FitError, match=f"no such checkpoint.*{NEWEST}"):
        resolve_resume(case.dir, "step-000099.ckpt", verify=True, command="c")


# ----------------------------------------------------------------------------- row 7: validation split
def test_validation_off_with_val_fraction_zero(capsys, tmp_path, small_corpus):
    c = Case(tmp_path / "v0", tmp_path / "v0.yaml", small_corpus)
    c.write_recipe(**{"data.val_fraction": 0.0, "data.max_docs": 120, "trainer.max_steps": 2})
    text = trained_ok(capsys, c)
    assert "no validation split" in text
    result = json.loads((c.dir / "fit_result.json").read_text())
    assert result["steps"] == 2 and "heldout_perplexity" not in result


def test_one_document_corpus_with_a_val_fraction_is_one_clear_error(capsys, tmp_path):
    corpus = tmp_path / "one.jsonl"
    corpus.write_text(json.dumps({"text": "Helium is a chemical element with symbol He."}) + "\n")
    c = Case(tmp_path / "one", tmp_path / "one.yaml", corpus)
    c.write_recipe()
    c.dir.mkdir()
    refused(capsys, c, names=(corpus, "`data.val_fraction`", "data.val_fraction=0"))


# ----------------------------------------------------------------------------- row 8: model.json without checksums
def test_model_without_checksums_needs_an_explicit_flag(case, tmp_path):
    from hmlm.export import ModelDirError, load_model_dir

    model = case.dir / "model"
    meta = json.loads((model / "model.json").read_text())
    sums = meta.pop("checksums")
    (model / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match=r"model\.json: key `checksums` is missing.*verify=False.*--no-verify"):
        load_model_dir(model)
    assert load_model_dir(model, verify=False).model.store is not None
    # leaving one file out of the checksums is refused too, naming that file
    meta["checksums"] = {k: v for k, v in sums.items() if k != "anchor.safetensors"}
    (model / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match=r"anchor\.safetensors: not covered by key `checksums`"):
        load_model_dir(model)


def test_bank_files_record_cannot_be_edited_away(case):
    """Model format 2 verifies bank files block by block against model.json `bank_files` (not a file sha256 in
    `checksums`): a changed, deleted or missing record, or a per-tensor file put in place, is refused."""
    from safetensors.torch import save_file

    from hmlm.export import ModelDirError, load_model_dir

    model = case.dir / "model"
    meta_path = model / "model.json"
    good = json.loads(meta_path.read_text())
    assert set(good["bank_files"]) == {p.name for p in (model / "bank").iterdir()}

    def refused_with(meta, pattern):
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(ModelDirError, match=pattern):
            load_model_dir(model)

    tampered = json.loads(json.dumps(good))
    tampered["bank_files"]["l1.safetensors"]["frame_sha256"] = "0" * 64
    refused_with(tampered, r"l1\.safetensors: size, header or checksum table differ from what model\.json recorded")
    dropped = json.loads(json.dumps(good))
    del dropped["bank_files"]["l0.safetensors"]
    refused_with(dropped, r"bank/l0\.safetensors: not covered by key `checksums`")
    refused_with({k: v for k, v in good.items() if k != "bank_files"}, r"bank/\w+\.safetensors: not covered")
    # the record intact, the file swapped for an unverifiable per-tensor one of the same values
    meta_path.write_text(json.dumps(good))
    store = load_model_dir(model).model.store
    legacy = model / "bank" / "l2.safetensors"
    save_file({n: t.contiguous() for n, t in store.named_tensors("l2").items()}, str(legacy))
    refused_with(good, r"l2\.safetensors: not the bank file model\.json recorded")
    assert load_model_dir(model, verify=False).model.store is not None  # the explicit opt-out still loads it


def test_interrupted_replace_is_rolled_back_not_deleted(tmp_path):
    from hmlm.utils import recover_atomic_dir

    (tmp_path / ".index.old").mkdir()
    (tmp_path / ".index.old" / "index.json").write_text("{}")
    (tmp_path / ".index.ab12cd.tmp").mkdir()
    notes = recover_atomic_dir(tmp_path / "index")
    assert (tmp_path / "index" / "index.json").is_file() and not (tmp_path / ".index.old").exists()
    assert not (tmp_path / ".index.ab12cd.tmp").exists() and len(notes) == 2

"""fit's held-out measurement kept in the model directory (hmlm.eval.heldout_record): `hmlm eval` reports it only
when it is exactly the measurement eval would make, and then with the same digits as measuring again."""
from __future__ import annotations

import json
import os
import shutil

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from rich.console import Console  # noqa: E402

from hmlm.eval.heldout_record import RECORD_FILE, measurement_key, read_record, write_record  # noqa: E402
from hmlm.eval.report import EvalOptions, run_eval  # noqa: E402
from hmlm.export import load_model_dir  # noqa: E402

COUNT = {3: 40, 7: 12}
NLL = {"fetched": {3: 101.25, 7: 30.000000000000004}, "none": {3: 120.5, 7: 33.1}}


def _key(**change):
    meta = {"checksums": {"anchor.safetensors": "a" * 64, "shards/val-00000.safetensors": "b" * 64,
                          "tree.safetensors": "c" * 64},
            "bank_files": {"l0.safetensors": {"bytes": 10, "frame_sha256": "d" * 64}}}
    key = measurement_key(meta, device="cpu", batch_size=8, doc_mask=True)
    key.update(change)
    return key


def test_a_record_is_read_back_exactly_under_its_key_only(tmp_path):
    write_record(tmp_path, _key(), COUNT, NLL)
    count, nll, created = read_record(tmp_path, _key(), ["fetched", "none"])
    assert count == COUNT and nll == NLL and created != "?"
    assert read_record(tmp_path, _key(), ["none"])[1] == {"none": NLL["none"]}
    for other in (_key(batch_size=16), _key(device="cuda"), _key(torch="0.0"), _key(files={})):
        assert read_record(tmp_path, other, ["fetched"]) is None
    assert read_record(tmp_path, _key(), ["generic"]) is None   # a mode fit did not measure
    (tmp_path / RECORD_FILE).write_text("{not json", encoding="utf-8")
    assert read_record(tmp_path, _key(), ["fetched"]) is None
    assert read_record(tmp_path / "nowhere", _key(), ["fetched"]) is None


def test_the_key_names_the_weights_and_shards_not_the_other_files():
    key = _key()
    assert set(key["files"]) == {"anchor.safetensors", "shards/val-00000.safetensors"}
    assert key["bank"] == {"l0.safetensors": "d" * 64} and key["device"] == "cpu"


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def _eval(model, out, **opts):
    return run_eval(EvalOptions(models=[str(model)], tasks=["hmlm_atomic_number"], memory=["fetched", "none"],
                                limit=2, max_gen_toks=2, out=str(out), **opts), Console(file=open(os.devnull, "w")))


def test_eval_reports_fit_s_record_with_the_digits_of_measuring_again(model_copy, tmp_path):
    from hmlm.train.fit import _heldout

    measured = _eval(model_copy, tmp_path / "a")["models"][0]["perplexity"]
    assert measured["source"] == "measured" and not (model_copy / RECORD_FILE).exists()
    # the record as fit writes it at the end of training (same function, on the directory's own held-out shards)
    loaded = load_model_dir(model_copy)
    _heldout(model_copy, loaded.model, model_copy, 1, loaded.device, loaded.recipe, False,
             Console(file=open(os.devnull, "w")))
    recorded = _eval(model_copy, tmp_path / "b")["models"][0]["perplexity"]
    assert recorded["source"].startswith("recorded by hmlm fit")
    assert {k: v for k, v in recorded.items() if k != "source"} == \
        {k: v for k, v in measured.items() if k != "source"}
    again = _eval(model_copy, tmp_path / "c", recompute_perplexity=True)["models"][0]["perplexity"]
    assert again["source"] == "measured" and again["overall"] == recorded["overall"]


def test_a_record_of_other_files_is_not_used(model_copy, tmp_path):
    loaded = load_model_dir(model_copy)
    key = measurement_key(loaded.meta, device=loaded.device, batch_size=loaded.recipe.trainer.batch_size,
                          doc_mask=loaded.recipe.data.doc_mask)
    fake = {m: {leaf: 0.0 for leaf in range(4096)} for m in ("fetched", "none")}
    other = dict(key, files={**key["files"], "anchor.safetensors": "0" * 64})   # weights that are not these
    write_record(model_copy, other, {leaf: 1 for leaf in range(4096)}, fake)
    report = _eval(model_copy, tmp_path / "a")
    assert report["models"][0]["perplexity"]["source"] == "measured"
    assert report["models"][0]["perplexity"]["overall"]["none"] > 1.5
    record = json.loads((model_copy / RECORD_FILE).read_text(encoding="utf-8"))
    assert record["key"] == other   # eval reads the record, it never rewrites it

"""Self-contained model directories (a copy evaluates identically from another working directory; what is missing
is said once), frequency buckets for an external lm-eval task, lm-eval's entry point and CLI defaults, and a quiet
`simple_evaluate` (CPU, offline)."""
from __future__ import annotations

import importlib.metadata as md
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from hmlm.cli import main  # noqa: E402
from hmlm.eval.harness import with_default_batch  # noqa: E402

from conftest import REPO, json_load  # noqa: E402

EXAMPLE = REPO / "evals" / "examples" / "capitals"


def _eval(model: Path, out: Path, *extra: str) -> dict:
    assert main(["eval", "--model", str(model), "--out", str(out), "--limit", "3", "--max-gen-toks", "3",
                 "--tasks", "hmlm_atomic_number,hmlm_capital,hmlm_heldout_lastword", *extra]) == 0
    return json_load(out / "report.json")


def _results(report: dict) -> list:
    return [{k: v for k, v in m.items() if k not in ("label", "path")} for m in report["models"]]


def test_copied_model_evaluates_identically_from_another_directory(tiny_model_dir, tmp_path, monkeypatch):
    model_json = json_load(tiny_model_dir / "model.json")
    assert model_json["eval_data"]["mentions"]["dir"] == "mentions"   # every path relative to the model dir
    for rel in ("shards", "node_stats.safetensors", "mentions/words.safetensors", "mentions/vocab.txt"):
        assert (tiny_model_dir / rel).exists(), rel
    original = _eval(tiny_model_dir, tmp_path / "a")
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_model_dir, copy)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)   # not the directory fit ran in, nor the model's parent
    moved = _eval(copy, tmp_path / "b")
    assert _results(moved) == _results(original)
    first = original["models"][0]
    assert first["notes"] == [] and set(first["perplexity"]["overall"]) == {"fetched", "generic", "none"}
    task = first["modes"]["fetched"]["tasks"]["hmlm_atomic_number"]
    assert task["buckets"] and all(i["count_source"] == "corpus" for i in task["items"])


def _as_older_export(model: Path, index_dir: str) -> None:
    """Make `model` look like a model directory written before it carried its evaluation data."""
    import json

    for rel in ("shards", "mentions", "node_stats.safetensors"):
        target = model / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    meta = json_load(model / "model.json")
    meta.pop("eval_data")
    meta["checksums"] = {k: v for k, v in meta["checksums"].items() if (model / k).is_file()}
    meta["index"]["dir"] = index_dir
    (model / "model.json").write_text(json.dumps(meta), encoding="utf-8")


def test_older_model_dirs_find_their_index_beside_them_or_say_once_what_is_lost(tiny_model_dir, tmp_path, capsys):
    # recorded relative to the directory fit ran in, as older exports did: found beside the model directory
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir.parent / "index", run / "index")
    shutil.copytree(tiny_model_dir, run / "model")
    _as_older_export(run / "model", "runs/quickstart/index")
    beside = _eval(run / "model", tmp_path / "a")["models"][0]
    assert beside["notes"] == [] and "perplexity" in beside
    assert beside["modes"]["none"]["tasks"]["hmlm_atomic_number"]["buckets"]

    lost = tmp_path / "lost" / "model"
    shutil.copytree(tiny_model_dir, lost)
    _as_older_export(lost, "gone/index")
    capsys.readouterr()
    first = _eval(lost, tmp_path / "b")["models"][0]
    printed = capsys.readouterr().out
    assert "perplexity" not in first and len(first["notes"]) == 2
    assert printed.count("held-out perplexity is left out") == 1
    assert printed.count("entity mentions cannot be counted") == 1
    for mode in ("fetched", "generic", "none"):   # every mode still ran, with accuracy and no buckets
        task = first["modes"][mode]["tasks"]["hmlm_atomic_number"]
        assert task["value"] is not None and task["buckets"] is None
        assert all(i["count"] is None and i["entity_key"] == f"element/{i['entity']}" for i in task["items"])


def test_external_task_declares_its_entity_and_gets_buckets(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny_model_dir), "--out", str(out), "--memory", "fetched,none",
                 "--include-path", str(EXAMPLE), "--tasks", "example_capitals,example_capitals_qa",
                 "--no-perplexity"]) == 0
    report = json_load(out / "report.json")
    for task in ("example_capitals", "example_capitals_qa"):
        r = report["models"][0]["modes"]["fetched"]["tasks"][task]
        assert r["n"] == 15 and sum(b["n"] for b in r["buckets"].values()) == 15
        by_entity = {i["entity"]: i for i in r["items"]}
        # the external items are the bundled countries: no "'France' also names country/FR"
        assert by_entity["France"]["entity_key"] == "country/FR" and by_entity["France"]["flags"] == []
        assert by_entity["Georgia"]["flags"] == ["'Georgia' is a common word"]
        assert r["flagged"] == ["Chad", "Georgia", "Jordan"]


def test_harness_asks_for_a_real_batch_unless_told():
    run = ["--model", "hmlm", "--tasks", "t"]
    assert with_default_batch(run, 32) == [*run, "--batch_size", "32"]
    for chosen in (["-b", "4"], ["--batch_size", "4"], ["--batch_size=4"], ["--config", "c.yaml"]):
        assert with_default_batch(run + chosen, 32) == run + chosen
    assert with_default_batch(["ls", "tasks"], 32) == ["ls", "tasks"]


def test_lm_eval_model_entry_point_is_declared_and_loads_the_adapter():
    from hmlm.eval.adapter import HMLMEvalLM

    eps = [ep for ep in md.entry_points(group="lm_eval.models") if ep.name == "hmlm"]
    assert [ep.value for ep in eps] == ["hmlm.eval.adapter:HMLMEvalLM"], "re-run scripts/setup-env.sh"
    assert eps[0].dist.name == "hmlm" and eps[0].load() is HMLMEvalLM


def test_simple_evaluate_prints_no_git_or_metadata_noise_outside_a_repository(tiny_model_dir, tmp_path, monkeypatch, capfd):
    import lm_eval

    from hmlm.eval.adapter import HMLMEvalLM
    from hmlm.eval.report import task_manager

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))   # tmp_path is never inside a repo
    res = lm_eval.simple_evaluate(model=HMLMEvalLM(path=str(tiny_model_dir)), tasks=["hmlm_atomic_number"],
                                  task_manager=task_manager(["hmlm_atomic_number"]), limit=1, bootstrap_iters=0)
    assert res["git_hash"] is None
    err = capfd.readouterr().err
    assert "not a git repository" not in err
    assert "Custom kwargs" not in err   # lm-eval's advice for custom_dataset tasks, which take no kwargs

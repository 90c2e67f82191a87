"""hmlm eval's second worker thread (hmlm.eval.lane): job order, errors, per-thread torch threads, and that running the
key embeddings and the held-out perplexity beside lm-eval's loop gives the results of running everything in turn."""
from __future__ import annotations

import os
import threading

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from hmlm.eval.lane import Lane  # noqa: E402
from hmlm.eval.leafppl import leaf_perplexity, perplexity_by_leaf  # noqa: E402
from hmlm.eval.modeldata import EvalData  # noqa: E402
from hmlm.eval.perplexity import leaf_nll  # noqa: E402
from hmlm.eval.report import evaluate_modes, load_tasks, task_manager  # noqa: E402
from hmlm.export import load_model_dir  # noqa: E402

TASKS = ["hmlm_atomic_number", "hmlm_heldout_lastword"]
MODES = ["fetched", "generic", "none"]


def test_lane_runs_jobs_by_priority_then_submission_and_hands_back_errors():
    lane = Lane()
    gate, ran = threading.Event(), []
    lane.submit(0, gate.wait)   # holds the worker until every job below is queued
    futures = [lane.submit(p, ran.append, name) for p, name in ((1, "ppl-a"), (1, "ppl-b"), (0, "keys"))]
    failed = lane.submit(2, lambda: 1 / 0)
    assert lane.busy
    gate.set()
    assert [f.result(timeout=10) for f in futures] == [None, None, None]
    with pytest.raises(ZeroDivisionError):
        failed.result(timeout=10)
    lane.close()
    assert ran == ["keys", "ppl-a", "ppl-b"] and not lane.busy


def test_lane_sets_torch_threads_on_its_thread_only():
    before = torch.get_num_threads()
    lane = Lane(threads=1)
    assert lane.submit(0, torch.get_num_threads).result(timeout=10) == 1
    lane.close()
    assert torch.get_num_threads() == before


@pytest.fixture(scope="module")
def task_dict():
    return load_tasks(task_manager(TASKS), TASKS)


def _strip(results: dict) -> dict:
    return {mode: {task: {k: v for k, v in r.items() if k != "metrics"} | {"value": r["value"]}
                   for task, r in per_task.items()} for mode, per_task in results.items()}


def test_modes_beside_the_lane_equal_modes_in_turn_and_embed_each_key_once(tiny_model_dir, task_dict):
    alone = evaluate_modes(load_model_dir(tiny_model_dir), task_dict, MODES, limit=6, batch_size=4)
    loaded = load_model_dir(tiny_model_dir)
    calls: list[tuple[str, list[str]]] = []
    embed = loaded.embedder.embed

    def counting(texts, **kwargs):
        calls.append((threading.current_thread().name, list(texts)))
        return embed(texts, **kwargs)

    loaded.embedder.embed = counting
    lane = Lane(threads=1, name="test-lane")
    try:
        beside = evaluate_modes(loaded, task_dict, MODES, limit=6, batch_size=4, lane=lane)
    finally:
        lane.close()
    assert list(beside) == MODES   # reported in the order asked for, whatever order they ran in
    assert _strip(beside) == _strip(alone)
    for mode in MODES:   # scores equal up to the rounding of one torch thread against the default count
        for task in TASKS:
            for k, v in alone[mode][task]["metrics"].items():
                assert beside[mode][task]["metrics"][k] == pytest.approx(v, rel=1e-6)
    texts = [t for _, batch in calls for t in batch]
    assert calls and {name for name, _ in calls} == {"test-lane"}   # embedded there, before fetched needed them
    assert len(texts) == len(set(texts))   # each distinct key once, for all tasks and modes


def test_leaf_nll_per_mode_merged_equals_one_pass_over_all_modes(tiny_model_dir):
    loaded = load_model_dir(tiny_model_dir)
    heldout = EvalData.of(loaded).heldout
    assert heldout is not None
    whole = perplexity_by_leaf(loaded, heldout, modes=MODES, batch_size=5)
    count, nll = {}, {}
    for mode in MODES:   # as hmlm eval runs them, one job per mode on its lane
        count, per_mode = leaf_nll(loaded, heldout, modes=[mode], batch_size=5)
        nll.update(per_mode)
    assert leaf_perplexity(heldout, count, nll) == whole


def test_load_embedder_loads_a_lazy_embedder_once(tiny_model_dir):
    loaded = load_model_dir(tiny_model_dir)
    loads = []
    loaded.embedder.load = lambda: loads.append(1)   # an embedder that loads lazily offers load()
    loaded.load_embedder()
    assert loads == [1]


@pytest.mark.parametrize("concurrent", [True, False])
def test_perplexity_runs_beside_the_tasks_only_for_anchors_that_allow_concurrent_forwards(
        tiny_model_dir, tmp_path, monkeypatch, concurrent):
    import hmlm.anchors.openlm as openlm
    import hmlm.eval.perplexity as perplexity
    from hmlm.eval.report import EvalOptions, run_eval

    monkeypatch.setattr(openlm.OpenLMAnchor, "concurrent_forward", concurrent)
    threads, original = [], perplexity.leaf_nll

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(perplexity, "leaf_nll", recording)
    report = run_eval(EvalOptions(models=[str(tiny_model_dir)], tasks=["hmlm_atomic_number"], limit=2, batch_size=4,
                                  out=str(tmp_path)))
    assert set(report["models"][0]["perplexity"]["overall"]) == set(MODES)
    assert threads == (["hmlm-eval-lane"] * 3 if concurrent else ["MainThread"])

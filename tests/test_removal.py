"""Knowledge removal (`hmlm eval --removal`, hmlm.eval.removal): the rule that picks the nodes to block, read from a
hand-made mention index; on a tiny trained model, the removed entity's items never fetch a blocked node, exactly the
other items that crossed a blocked node are rerouted, and scoring each distinct (item, rerouted path) once, with the
fetched result reused for an unchanged path, gives what lm-eval scoring everything under the block gives."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from hmlm.cli import main  # noqa: E402
from hmlm.eval.mentions import MentionIndex, write_mention_dir  # noqa: E402
from hmlm.eval.modeldata import EvalData  # noqa: E402
from hmlm.knowledge import NodeHits, blocked_memory, entity_nodes, removal_nodes  # noqa: E402

from conftest import json_load  # noqa: E402

TASK = "hmlm_atomic_number"
N = 12   # items: each is a greedy generation of up to 16 tokens per block set that reroutes it


def _hand_made(tmp_path: Path) -> EvalData:
    """8 training documents in a k=2, 2-level tree; Hafnium is mentioned 6 times under level-1 node 0 (4 of them in
    leaf 1), twice under node 1 (leaf 3), and nowhere else."""
    texts = ["Hafnium hafnium Hafnium", "hafnium", "nothing here", "Hafnium.", "other", "other text",
             "Hafnium and hafnium", "none"]
    paths = np.array([[0, 1], [0, 1], [0, 0], [0, 0], [1, 2], [1, 2], [1, 3], [1, 3]], dtype=np.int32)
    folder = tmp_path / "mentions"
    write_mention_dir(folder, MentionIndex.from_texts(texts), paths)
    return EvalData("hand-made", mentions=folder)


def test_the_rule_picks_the_nodes_holding_the_entitys_mentions(tmp_path):
    hits = entity_nodes(_hand_made(tmp_path), ["Hafnium"])
    by_level = {(h.level, h.node): (h.documents, h.mentions) for h in hits}
    assert by_level == {(1, 0): (3, 5), (1, 1): (1, 2), (2, 1): (2, 4), (2, 0): (1, 1), (2, 3): (1, 2)}
    # level 1: node 0 holds 5 of 7 mentions; node 1 holds 2/7 = 29%
    assert [h.node for h in removal_nodes(hits, 1, 0.3)] == [0]
    assert [h.node for h in removal_nodes(hits, 1, 0.25)] == [0, 1]
    # level 2: leaf 1 holds 4/7; leaves 3 (2/7) and 0 (1/7) only at a low share; the top node always
    assert [h.node for h in removal_nodes(hits, 2, 0.5)] == [1]
    assert [h.node for h in removal_nodes(hits, 2, 0.2)] == [1, 3]
    assert [h.node for h in removal_nodes(hits, 2, 0.1)] == [1, 3, 0]
    assert [h.node for h in removal_nodes(hits, 2, 1.0)] == [1]
    assert blocked_memory(removal_nodes(hits, 2, 0.2)) == "blocked:2:1+2:3"
    assert removal_nodes(entity_nodes(_hand_made(tmp_path), ["Zirconium"]), 1) == []
    with pytest.raises(ValueError, match="min_share"):
        removal_nodes(hits, 1, 0.0)


def test_ties_go_to_more_documents_then_the_lower_node():
    hits = [NodeHits(1, 5, 1, 3, 10), NodeHits(1, 2, 3, 3, 10), NodeHits(1, 7, 3, 3, 10)]
    assert [h.node for h in removal_nodes(hits, 1, 1.0)] == [2]


@pytest.fixture(scope="module")
def measured(tiny_model_dir):
    """The removal measurement of the tiny model on the first N atomic-number items, every level."""
    from hmlm.eval.buckets import FrequencyCounter
    from hmlm.eval.removal import RemovalOptions, measure
    from hmlm.eval.report import load_tasks, task_manager
    from hmlm.export import load_model_dir

    loaded = load_model_dir(tiny_model_dir)
    task_dict = load_tasks(task_manager([TASK]), [TASK])
    data = EvalData.of(loaded)
    counter = FrequencyCounter.for_model(data)
    result = measure(loaded, task_dict, data, counter, RemovalOptions(min_share=0.2), limit=N, progress=False)
    return loaded, task_dict, result


def _items(loaded, task_dict):
    """(doc_id, entity name, prompt) of the first N items, as the task gives them."""
    docs = list(task_dict["tasks"][TASK].eval_docs)[:N]
    return [(i, d["entity"], d["prompt"]) for i, d in enumerate(docs)]


def _blocked(row) -> list[tuple[int, int]]:
    return [(int(p.split(":")[0]) - 1, int(p.split(":")[1])) for p in row["memory"][len("blocked:"):].split("+")]


def test_blocked_nodes_are_never_fetched_for_the_removed_entity(measured):
    loaded, task_dict, result = measured
    assert result["entities_measured"] >= 3 and result["levels"] == [1, 2, 3]
    items = _items(loaded, task_dict)
    base = loaded.route([p for _, _, p in items])
    for entity in result["entities"]:
        own = [k for k, (_, name, _) in enumerate(items) if name == entity["name"]]
        assert own, entity["name"]
        for lv, row in entity["levels"].items():
            blocked = _blocked(row)
            assert {lvl for lvl, _ in blocked} == {int(lv) - 1}
            paths = loaded.route([items[k][2] for k in own], blocked=blocked)
            for lvl, node in blocked:
                assert not (paths[:, lvl] == node).any()
            crossed = {k for k in own if any(int(base[k, lvl]) == node for lvl, node in blocked)}
            assert row["removed"]["rerouted"] == len(crossed)


def test_control_items_are_rerouted_exactly_when_their_path_crosses_a_blocked_node(measured):
    loaded, task_dict, result = measured
    items = _items(loaded, task_dict)
    prompts = [p for _, _, p in items]
    base = loaded.route(prompts)
    some_rerouted = False
    for entity in result["entities"]:
        others = [k for k, (_, name, _) in enumerate(items) if name != entity["name"]]
        for row in entity["levels"].values():
            blocked = _blocked(row)
            paths = loaded.route(prompts, blocked=blocked)
            crossed = {k for k in others if any(int(base[k, lvl]) == node for lvl, node in blocked)}
            for k in others:   # a control item whose path stays clear of the block keeps its path exactly
                assert (paths[k] == base[k]).all() == (k not in crossed)
            assert row["others"]["rerouted"] == len(crossed) and row["others"]["n"] == len(others)
            some_rerouted |= bool(crossed)
    assert some_rerouted   # the level-1 blocks take other elements' subtrees too: the control is not vacuous


def test_scoring_once_per_item_and_path_matches_lm_eval_under_every_block(measured):
    """The shortcut (each distinct (item, rerouted path) scored once, all block sets batched together; unchanged
    paths keep their fetched result) against lm-eval scoring every item under the block, for every distinct block
    set of level 1 (it reroutes other entities' items too: rescored and reused results are checked) and one of
    level 3."""
    from hmlm.eval.removal import score

    loaded, task_dict, result = measured
    items = _items(loaded, task_dict)
    assert result["scored_pairs"] < result["rerouted_items"]   # block sets share rerouted paths
    specs = list(dict.fromkeys(e["levels"]["1"]["memory"] for e in result["entities"]))
    specs += list(dict.fromkeys(e["levels"]["3"]["memory"] for e in result["entities"]))[:1]
    full_of = {spec: score(loaded, task_dict, spec, limit=N) for spec in specs}   # one lm-eval run per block set
    checked = set()
    for entity in result["entities"]:
        for lv in ("1", "3"):
            row = entity["levels"][lv]
            if row["memory"] not in full_of:
                continue
            full = full_of[row["memory"]]
            checked.add(row["memory"])
            for group, members in (("removed", [k for k, (_, n, _) in enumerate(items) if n == entity["name"]]),
                                   ("others", [k for k, (_, n, _) in enumerate(items) if n != entity["name"]])):
                g = row[group]
                assert g["blocked"] == sum(full[(TASK, k)][0] for k in members)
                assert g["logp_blocked"] == pytest.approx(sum(full[(TASK, k)][1] for k in members), abs=1e-3)
    assert any(e["levels"]["1"]["others"]["rerouted"] for e in result["entities"]) and len(checked) >= 3


def test_pinned_paths_reproduce_the_routed_run(measured):
    """Replaying lm-eval's requests with each item's own routed path pinned gives lm-eval's fetched results."""
    from hmlm.eval.removal import score
    from hmlm.eval.rescore import Job, PinnedPathsLM, capture, order_jobs, rescore

    loaded, task_dict, _ = measured
    fetched = score(loaded, task_dict, "fetched", limit=N)
    requests = capture(task_dict)
    assert sorted(requests) == sorted(fetched)
    prompts = [requests[i][0].args[0] for i in sorted(requests)]
    paths = loaded.route(prompts)
    lm = PinnedPathsLM(loaded=loaded, memory="fetched", batch_size=5)   # batches that cut across paths
    jobs = order_jobs(lm, requests, [Job(i, tuple(p.tolist())) for i, p in zip(sorted(requests), paths)])
    advanced = []
    got = rescore(lm, task_dict, requests, jobs, chunk=4, advance=advanced.append)
    assert advanced == [4, 4, 4] and set(got) == set(jobs)
    for job, (ok, ll) in got.items():
        assert ok == fetched[job.item][0]
        assert ll == pytest.approx(fetched[job.item][1], abs=1e-4)
    assert rescore(lm, task_dict, requests, jobs, chunk=4, deadline=0.0) == {}   # past the deadline: nothing starts
    with pytest.raises(RuntimeError, match="pinned paths"):
        lm.route_keys(["a prompt"])   # each call's paths are used once


def test_a_removal_budget_that_runs_out_names_the_levels_not_measured(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny_model_dir), "--removal", "--limit", "4", "--removal-entities", "2",
                 "--removal-budget-s", "0.001", "--out", str(out)]) == 0
    model = json_load(out / "removal.json")["models"][0]
    assert model["levels"] == [] and model["levels_skipped"] == [1, 2, 3] and model["summary"] == {}
    assert "Not measured (--removal-budget-s 0.001 ran out): level(s) 1, 2, 3." in (out / "removal.md").read_text()
    assert (out / "removal.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_removal_command_writes_json_markdown_and_png(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny_model_dir), "--removal", "--limit", "6", "--removal-levels", "2,3",
                 "--removal-entities", "2", "--out", str(out)]) == 0
    report = json_load(out / "removal.json")
    model = report["models"][0]
    assert report["tasks"] == [TASK] and model["levels"] == [2, 3] and model["entities_measured"] == 2
    for lv in ("2", "3"):
        for group in ("removed", "others"):
            g = model["summary"][lv][group]
            assert g["n"] > 0 and all(0 <= g[f"acc_{m}"] <= 1 for m in ("fetched", "blocked", "none"))
    md = (out / "removal.md").read_text()
    assert "| 2 (removed entity) |" in md and "| 3 (other entities) |" in md
    assert (out / "removal.png").read_bytes()[:4] == b"\x89PNG"


def test_the_route_rule_blocks_where_the_entitys_own_items_go(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny_model_dir), "--removal", "--removal-rule", "route", "--limit", "4",
                 "--removal-levels", "3", "--removal-entities", "2", "--out", str(out)]) == 0
    model = json_load(out / "removal.json")["models"][0]
    assert model["rule"] == "route" and model["entities_measured"] == 2
    for entity in model["entities"]:
        removed = entity["levels"]["3"]["removed"]
        assert removed["rerouted"] == removed["n"] > 0   # every own item loses the leaf it fetched
    assert "rule `route`" in (out / "removal.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--removal", "--memory", "fetched"], "leave out --memory"),
    (["--removal", "--removal-levels", "4"], "levels 1..3"),
    (["--removal", "--removal-share", "0"], "--removal-share"),
    (["--removal-entities", "3"], "only go with --removal"),
    (["--removal-rule", "route"], "only go with --removal"),
    (["--removal-budget-s", "10"], "only go with --removal"),
    (["--removal", "--removal-budget-s", "0"], "--removal-budget-s 0.0: must be > 0"),
    (["--removal", "--tasks", "hmlm_heldout_lastword"], "declares the entity"),
])
def test_bad_removal_arguments_are_one_line_errors(tiny_model_dir, tmp_path, capsys, args, message):
    assert main(["eval", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--limit", "2", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err

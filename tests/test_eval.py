"""The lm-eval adapter on a tiny trained model: lm-eval's own API, retrieval keys, batching, memory modes, the
`hmlm eval` command and the in-training callback (CPU, offline)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from hmlm.cli import main  # noqa: E402
from hmlm.eval import EvalError  # noqa: E402
from hmlm.eval.adapter import HMLMEvalLM, retrieval_keys  # noqa: E402
from hmlm.eval.callback import BucketEvalCallback  # noqa: E402
from hmlm.eval.leafppl import perplexity_by_leaf  # noqa: E402
from hmlm.eval.perplexity import heldout_perplexity  # noqa: E402
from hmlm.eval.report import task_manager  # noqa: E402
from hmlm.eval.tasks import REPO_TASKS  # noqa: E402
from hmlm.export import load_model_dir  # noqa: E402

from conftest import json_load, tiny_recipe_dict  # noqa: E402


def _rows(name: str, n: int) -> list[dict]:
    lines = (REPO_TASKS / "data" / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:: max(1, len(lines) // n)][:n]]


PROMPTS = [r["prompt"] for r in _rows("atomic_number.jsonl", 10)] + \
          [r["prompt_qa"] for r in _rows("capital.jsonl", 6)] + [r["context"][-200:] for r in _rows(
              "heldout_lastword.jsonl", 8)]


def inst(kind: str, args: tuple, doc_id: int | None, task: str = "t") -> Instance:
    return Instance(kind, {}, args, 0, (task, doc_id, 1))


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def manager():
    return task_manager(["hmlm_atomic_number", "hmlm_heldout_lastword"])


def test_adapter_runs_under_lm_eval_simple_evaluate(loaded, manager, tiny_model_dir):
    assert get_model("hmlm") is HMLMEvalLM
    res = lm_eval.simple_evaluate(model=HMLMEvalLM(loaded=loaded, batch_size=4), task_manager=manager, limit=3,
                                  tasks=["hmlm_atomic_number", "hmlm_heldout_lastword", "hmlm_heldout_ppl"],
                                  log_samples=True, bootstrap_iters=0)
    r = res["results"]
    assert 0 <= r["hmlm_atomic_number"]["acc,none"] <= 1 and 0 <= r["hmlm_heldout_lastword"]["acc,none"] <= 1
    assert math.isfinite(r["hmlm_heldout_ppl"]["word_perplexity,none"]) and r["hmlm_heldout_ppl"][
        "word_perplexity,none"] > 1
    gens = [s["filtered_resps"][0] for s in res["samples"]["hmlm_atomic_number"]]
    assert len(gens) == 3 and all(isinstance(g, str) and "\n" not in g for g in gens)
    # the CLI's construction path: model_args string plus lm-eval's extra config
    lm = HMLMEvalLM.create_from_arg_string(f"path={tiny_model_dir},memory=none", {"batch_size": 2, "device": "cpu"})
    assert lm.memory.mode == "none" and lm.batch_size == 2


def test_retrieval_key_per_task_type(loaded):
    mc = [inst("loglikelihood", ("Question: Which gas is lightest?\nAnswer:", f" {c}"), 0) for c in ("H", "He")]
    schema = [inst("loglikelihood", (f"The trophy did not fit in the suitcase because the {w}", " was too big."), 1)
              for w in ("trophy", "suitcase")]
    lm_task = [inst("loglikelihood", ("Once upon a", " time"), 2)]
    bare = [("ctx A", " x"), ("ctx B", " y")]
    keys = retrieval_keys(mc + schema + lm_task + bare)
    assert keys[:2] == ["Question: Which gas is lightest?\nAnswer:"] * 2          # multiple choice: the question
    assert keys[2:4] == ["The trophy did not fit in the suitcase because the was too big."] * 2   # schema
    assert keys[4:] == ["Once upon a", "ctx A", "ctx B"]                          # LM: the context

    lm = HMLMEvalLM(loaded=loaded)
    seen: list[list[str]] = []
    route = lm.route_keys
    lm.route_keys = lambda ks: (seen.append(list(ks)), route(ks))[1]
    lm.loglikelihood(mc + schema)
    doc = "A whole held-out document. It has two sentences."
    lm.loglikelihood_rolling([inst("loglikelihood_rolling", (doc,), 0)])
    lm.generate_until([inst("generate_until", ("The atomic number of Iron is", {"until": ["\n"], "max_gen_toks": 3}),
                            0)])
    assert seen == [keys[:4], [doc], ["The atomic number of Iron is"]]


def test_batching_by_path_equals_one_by_one(loaded):
    reqs = [(p, " 26") for p in PROMPTS] + [(p, " the end") for p in PROMPTS[:6]]
    one = HMLMEvalLM(loaded=loaded, batch_size=1)
    many = HMLMEvalLM(loaded=loaded, batch_size=7)
    assert len({tuple(p) for p in many.route_keys(PROMPTS).tolist()}) > 1   # several paths share batches
    for (a, ga), (b, gb) in zip(one.loglikelihood(reqs), many.loglikelihood(reqs)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    gen = [(p, {"until": ["\n"], "max_gen_toks": 4}) for p in PROMPTS[:12]]
    assert one.generate_until(gen) == many.generate_until(gen)
    doc = " ".join(PROMPTS)   # longer than seq_len: several rolling windows on one path
    assert one.loglikelihood_rolling([(doc,)])[0] == pytest.approx(many.loglikelihood_rolling([(doc,)])[0], abs=1e-3)


@pytest.mark.parametrize("memory", ["fetched", "none"])
def test_multiple_choice_scored_from_one_cached_context_equals_full_rows(loaded, memory, monkeypatch):
    # 40-way choices of two questions share their context: it runs once, then only each choice's tokens run
    choices = [f" {r['answer']}" for r in _rows("capital.jsonl", 40)]
    reqs = [inst("loglikelihood", (q, c), d) for d, q in enumerate(PROMPTS[:2]) for c in choices]
    reqs += [inst("loglikelihood", (PROMPTS[3], " 7"), 9)]   # a lone request takes the plain batch
    cached = HMLMEvalLM(loaded=loaded, memory=memory, batch_size=16)
    seqs_seen = []
    score = cached._score_from_cache
    monkeypatch.setattr(cached, "_score_from_cache", lambda prefix, *a: (seqs_seen.append(prefix), score(prefix, *a)))
    got = cached.loglikelihood(reqs)
    assert len(seqs_seen) == 2
    plain = HMLMEvalLM(loaded=loaded, memory=memory, batch_size=16)
    monkeypatch.setattr(plain, "_shared_contexts", lambda seqs, paths, live: ([], set(live)))
    for (a, ga), (b, gb) in zip(got, plain.loglikelihood(reqs)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_run_tasks_equals_simple_evaluate(loaded, manager):
    from hmlm.eval.report import load_tasks, run_tasks

    tasks = ["hmlm_atomic_number", "hmlm_heldout_lastword"]
    lm = HMLMEvalLM(loaded=loaded, batch_size=8, max_gen_toks=4)
    ours = run_tasks(lm, load_tasks(manager, tasks), limit=4)
    again = run_tasks(lm, load_tasks(manager, tasks), limit=4)   # loaded tasks are reusable
    theirs = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=4, log_samples=True,
                                     bootstrap_iters=0)
    for task in tasks:
        assert ours["results"][task] == again["results"][task] == theirs["results"][task]
        assert [s["filtered_resps"] for s in ours["samples"][task]] == \
            [s["filtered_resps"] for s in theirs["samples"][task]]


def test_none_equals_the_bare_anchor_and_memory_matters(loaded):
    reqs = [(p, " 42") for p in PROMPTS[:8]]
    none = HMLMEvalLM(loaded=loaded, memory="none", batch_size=3)
    with torch.no_grad():
        for (ctx, cont), (score, _) in zip(reqs, none.loglikelihood(reqs)):
            c, t = none._encode_pair(ctx, cont)
            ids = torch.tensor([c + t])
            logp = F.log_softmax(loaded.model.anchor(ids[:, :-1]).float(), -1)[0]
            expected = logp[len(c) - 1:].gather(1, torch.tensor(t)[:, None]).sum()
            assert score == pytest.approx(float(expected), abs=1e-5)
    fetched = HMLMEvalLM(loaded=loaded, memory="fetched").loglikelihood(reqs)
    generic = HMLMEvalLM(loaded=loaded, memory="generic").loglikelihood(reqs)
    plain = none.loglikelihood(reqs)
    assert max(abs(f[0] - n[0]) for f, n in zip(fetched, plain)) > 1e-6
    assert max(abs(g[0] - n[0]) for g, n in zip(generic, plain)) > 1e-6


def test_generic_block_is_fetched_once_per_batch_with_the_same_results(loaded, monkeypatch):
    lm = HMLMEvalLM(loaded=loaded, memory="generic", batch_size=8)
    memory = lm._memory_of(torch.zeros(3, lm.levels, dtype=torch.long))
    assert all(t.shape[0] == 3 and t.stride(0) == 0 for t in memory.tensors.values())   # views of one block
    reqs = [(p, " 7") for p in PROMPTS]
    gens = [(p, {"until": ["\n"], "max_gen_toks": 4}) for p in PROMPTS]
    viewed = lm.loglikelihood(reqs), lm.generate_until(gens)
    # against the block gathered into a copy per row, as every other mode fetches
    monkeypatch.setattr(HMLMEvalLM, "_memory_of", lambda self, p: self.model.memory_context(p, "generic"))
    assert (lm.loglikelihood(reqs), lm.generate_until(gens)) == viewed


def test_blocked_changes_fetched_blocks_for_that_subtree_only(loaded):
    fetched = HMLMEvalLM(loaded=loaded, memory="fetched")
    paths = fetched.route_keys(PROMPTS)
    node = int(paths[:, 0].mode().values)
    blocked = HMLMEvalLM(loaded=loaded, memory=f"blocked:1:{node}")
    rerouted = blocked.route_keys(PROMPTS)
    inside = paths[:, 0] == node
    assert inside.any() and (~inside).any()
    assert torch.equal(rerouted[~inside], paths[~inside])
    assert (rerouted[:, 0] != node).all()
    reqs = [(p, " 7") for p in PROMPTS]
    a, b = fetched.loglikelihood(reqs), blocked.loglikelihood(reqs)
    for i in range(len(reqs)):
        if inside[i]:
            assert a[i][0] != pytest.approx(b[i][0], abs=1e-7)
        else:
            assert a[i][0] == pytest.approx(b[i][0], abs=1e-5)
    for bad in ("blocked:4:0", "blocked:1:3", "blocked:x", "sometimes"):
        with pytest.raises(EvalError, match="memory="):
            HMLMEvalLM(loaded=loaded, memory=bad)


def test_leaf_perplexity_matches_heldout_perplexity(loaded):
    index_dir = Path(loaded.meta["index"]["dir"])
    overall = heldout_perplexity(loaded, index_dir, modes=["fetched", "none"], batch_size=8)
    by_leaf = perplexity_by_leaf(loaded, index_dir, modes=["fetched", "none"], batch_size=5)
    for mode in ("fetched", "none"):
        assert by_leaf["overall"][mode] == pytest.approx(overall[mode], rel=1e-5)
    assert sum(b["tokens"] for b in by_leaf["bins"]) == by_leaf["tokens"] == sum(x["tokens"] for x in by_leaf["leaves"])


def test_heldout_perplexity_runs_only_up_to_the_last_scored_label(loaded):
    # the widths leaf_nll cuts each sequence to: every scored label inside, only padding after; the tiny model's
    # held-out split has padded sequences, so the test above compares cut batches against full-width ones
    from hmlm.data.packing import IGNORE_INDEX, SequenceShards
    from hmlm.eval.perplexity import scored_widths

    data = SequenceShards(Path(loaded.meta["index"]["dir"]) / "shards", "val")
    widths = scored_widths(data)
    for i, width in enumerate(widths):
        labels = data[i]["labels"]
        assert (labels[width:] == IGNORE_INDEX).all()
        assert labels[width - 1] != IGNORE_INDEX or not (labels != IGNORE_INDEX).any()
    assert min(widths) < data.seq_len - 1


def test_one_pass_over_all_modes_equals_each_mode_from_full_logits(loaded):
    # the per-leaf sums of one pass for all modes (fused head, chunked log-softmax) against each mode alone, scored
    # from the full logits with cross_entropy as the report once did
    from torch.utils.data import DataLoader

    from hmlm.data.packing import SequenceShards
    from hmlm.eval.perplexity import leaf_nll

    index_dir = Path(loaded.meta["index"]["dir"])
    modes = ["fetched", "generic", "none"]
    count, nll = leaf_nll(loaded, index_dir, modes=modes, batch_size=3)
    for mode in modes:
        alone = leaf_nll(loaded, index_dir, modes=[mode], batch_size=8)
        assert alone[0] == count and alone[1][mode] == pytest.approx(nll[mode], rel=1e-5)
        want: dict[int, float] = {}
        for batch in DataLoader(SequenceShards(index_dir / "shards", "val"), batch_size=4):
            with torch.no_grad():
                logits = loaded.model(batch["input_ids"], paths=batch["path"], memory=mode,
                                      doc_ids=batch["doc_ids"] if loaded.recipe.data.doc_mask else None)
            rows = F.cross_entropy(logits.float().transpose(1, 2), batch["labels"], reduction="none").sum(1)
            for leaf, value in zip(batch["path"][:, -1].tolist(), rows.tolist()):
                want[leaf] = want.get(leaf, 0.0) + value
        assert nll[mode] == pytest.approx(want, rel=1e-5)
    assert len({round(sum(nll[m].values()), 3) for m in modes}) == 3   # the modes differ: each ran its own memory


@pytest.fixture(scope="module")
def anchor_model_dir(tiny_model_dir, small_corpus, tmp_path_factory) -> Path:
    """A second tiny model: anchor only (no bank), sharing the first one's index."""
    from hmlm.config import recipe_from_dict
    from hmlm.train.fit import fit

    out = tmp_path_factory.mktemp("anchor-model") / "run"
    recipe = recipe_from_dict(tiny_recipe_dict(small_corpus, out, **{
        "trainer.mode": "anchor", "trainer.max_steps": 3, "index.dir": str(tiny_model_dir.parent / "index")}))
    return Path(fit(recipe, progress=False, final_eval=False)["model_dir"])


def test_hmlm_eval_on_two_models_writes_json_and_plots(tiny_model_dir, anchor_model_dir, tmp_path, capsys,
                                                       monkeypatch):
    out = tmp_path / "report"
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    rc = main(["eval", "--model", str(tiny_model_dir), "--model", str(anchor_model_dir), "--tasks",
               "hmlm_atomic_number,hmlm_heldout_lastword", "--limit", "4", "--out", str(out), "--batch-size", "8",
               "--buckets", "0,10,100", "--max-gen-toks", "4"])
    assert rc == 0
    report = json_load(out / "report.json")
    first, second = report["models"]
    assert report["buckets"] == ["0-9", "10-99", ">=100"]
    assert list(first["modes"]) == ["fetched", "generic", "none"] and list(second["modes"]) == ["none"]
    assert set(second["skipped"]) == {"fetched", "generic"}
    task = first["modes"]["fetched"]["tasks"]["hmlm_atomic_number"]
    assert task["knowledge"] == "SK" and sum(b["n"] for b in task["buckets"].values()) == task["n"] == 4
    assert all(item["count_source"] == "corpus" and "bucket" in item for item in task["items"])
    assert first["modes"]["none"]["averages"]["CK"] is not None and first["modes"]["none"]["averages"]["SK"] is not None
    assert set(first["perplexity"]["overall"]) == {"fetched", "generic", "none"}
    for key in ("buckets_png", "perplexity_png"):
        assert Path(report["files"][key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    captured = capsys.readouterr()
    printed = captured.out
    assert "Avg-SK" in printed and "hmlm_atomic_number" in printed
    assert "it/s" not in captured.err and "%|" not in captured.err   # no lm-eval request bars (tqdm)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"   # set by the command before torch loads (hmlm.cli.main)

    assert main(["eval", "--model", str(tmp_path / "missing")]) == 2
    assert main(["eval", "--model", str(tiny_model_dir), "--memory", "blocked:9:9", "--out", str(out)]) == 2
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "no_such_task", "--out", str(out)]) == 2


def test_callback_logs_bucket_accuracies(loaded):
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    cb = BucketEvalCallback(every_n_steps=5, tasks=["hmlm_atomic_number"], limit=3, max_gen_toks=3)
    module = SimpleNamespace(recipe=loaded.recipe, model=loaded.model)
    loaded.model.train()
    for step in (1, 4, 5, 5, 7, 10):
        cb.on_train_batch_end(SimpleNamespace(global_step=step, is_global_zero=True, loggers=[logger]), module,
                              None, None, 0)
    assert [s for s, _ in logged] == [5, 10]
    metrics = logged[0][1]
    assert "eval/hmlm_atomic_number/fetched/acc" in metrics
    assert any(k.startswith("eval/hmlm_atomic_number/fetched/acc_bucket_") for k in metrics)
    assert loaded.model.training   # restored after evaluation
    loaded.model.eval()


def test_lm_eval_templates_are_compiled_once_and_render_the_same():
    # importing the adapter installed hmlm.eval.templates: same text as lm-eval's per-document compile
    import lm_eval.utils as utils

    template = "{{ prompt | regex_replace('\\\\s+', ' ') }}{% if answer %} -> {{ answer }}{% endif %}"
    docs = [{"prompt": "The  capital of\nFrance is", "answer": "Paris"}, {"prompt": "x", "answer": ""}]
    want = [utils.env.from_string(template).render(**d) for d in docs]
    compiles = []
    original = utils.env.from_string
    utils.apply_template("{{ warm }}", {"warm": 1})
    try:
        utils.env.from_string = lambda s: (compiles.append(s), original(s))[1]
        got = [utils.apply_template(template + " ", d) for d in docs]
    finally:
        utils.env.from_string = original
    assert got == [w + " " for w in want] and compiles == [template + " "]
    with pytest.raises(Exception, match="missing"):   # lm-eval's StrictUndefined still applies
        utils.apply_template("{{ missing }}", {})

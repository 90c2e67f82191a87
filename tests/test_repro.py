"""The reproduction driver (hmlm.bench.repro, benchmarks/gpu_repro.py) on the tiny CPU twins: every GPU code path of
the two GPU calls runs here first. Also: what the recipes promise (equal tokens, 10% fetched, a bank >= 10x S,
generic-only training, a frozen anchor)."""
from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import load_benchmark
from demo_sources import build_sources
from hmlm.bench.repro import RUNS, Options, merge, run_part
from hmlm.config import load_recipe
from hmlm.data.demo import build_demo

pytest.importorskip("mwparserfromhell")
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repro")
    build_demo(build_sources(root / "sources"), root / "demo", max_text_mb=None, log=lambda m: None)
    return root / "demo"


def _opts(demo_dir: Path, tmp: Path, **kw) -> Options:
    base = dict(out=tmp / "out", part="all", tiny=True, recipes=DEMO, demo=demo_dir, work=tmp / "work",
                facts_per_relation=10, eval_limit=2, budget_s=1e6, log=lambda m: None)
    return Options(**{**base, **kw})


def test_gpu_recipes_keep_the_promised_sizes(capsys):
    from hmlm.bench.repro import params

    got = {k: params(load_recipe(DEMO / f"{r.recipe}.yaml"), 8192) for k, r in RUNS.items()}
    s = got["S"]["anchor"]
    assert got["2S"]["anchor_non_embedding"] == 2 * got["S"]["anchor_non_embedding"] - 256   # one final norm
    for key in ("S+mem", "S+generic", "S->mem frozen"):
        assert 0.09 < got[key]["fetched"] / s < 0.11 and got[key]["bank"] >= 10 * s
    recipes = {k: load_recipe(DEMO / f"{r.recipe}.yaml") for k, r in RUNS.items()}
    assert {r.data.seq_len * r.trainer.batch_size for r in recipes.values()} == {512 * 64}   # equal tokens/step
    assert recipes["S+generic"].memory.generic_prob == 1.0 and recipes["S->mem frozen"].trainer.mode == "memory"
    for key, r in RUNS.items():       # every GPU recipe has a CPU twin of the same structure
        tiny = load_recipe(DEMO / "tiny" / f"{r.recipe}-tiny.yaml")
        full = recipes[key]
        assert (tiny.trainer.mode, tiny.memory.generic_prob) == (full.trainer.mode, full.memory.generic_prob)
        assert tiny.index.router.levels == full.index.router.levels


def test_budget_and_dependencies_skip_runs_with_reasons(demo_dir, tmp_path):
    summary = run_part(_opts(demo_dir, tmp_path, runs=("S->mem frozen", "S"), budget_s=0.0))
    runs = summary["runs"]
    assert runs["S->mem frozen"]["status"].startswith("skipped: needs the model of S")
    assert runs["S"]["status"].startswith("skipped: would end at")
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["index"]["max_steps"] >= 1 and saved["corpus"]["facts"] == 10 * 4 + 7 + 4  # 7 countries, 4 people
    assert not (tmp_path / "out" / "fig1_accuracy_by_frequency.png").exists()


def _gpu_script():
    return load_benchmark("gpu_repro")


def test_part_trains_evaluates_and_merges(demo_dir, tmp_path, monkeypatch):
    """The GPU call's whole path (benchmarks/gpu_repro.py's command line -> run_part) on the tiny twins, with one run
    failing on purpose: it is recorded, the others still train and evaluate, and the exit status says so."""
    import hmlm.bench.repro as repro

    train = repro.Part.train

    def train_or_fail(self, key):
        if key == "2S":
            raise RuntimeError("injected failure")
        return train(self, key)

    monkeypatch.setattr(repro.Part, "train", train_or_fail)
    order = ("S", "2S", "S+mem", "S+generic", "S->mem frozen")
    rc = _gpu_script().main(["--out", str(tmp_path / "out"), "--part", "all", "--tiny", "--runs", ",".join(order),
                             "--recipes", str(DEMO), "--demo", str(demo_dir), "--work", str(tmp_path / "work"),
                             "--facts-per-relation", "10", "--eval-limit", "2", "--budget-s", "1e6",
                             "--epochs", "0.01"])
    assert rc == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    runs = summary["runs"]
    assert runs["2S"]["status"] == "failed: RuntimeError: injected failure" and "traceback" in runs["2S"]
    del runs["2S"]
    assert {k: r["status"] for k, r in runs.items()} == dict.fromkeys(runs, "ok")
    steps = {r["steps"] for r in runs.values()}
    assert len(steps) == 1 and {r["tokens"] for r in runs.values()} == {steps.pop() * 8 * 64}   # equal tokens
    assert "eval" in runs["S+mem"], runs["S+mem"].get("traceback")
    assert set(runs["S+mem"]["eval"]) == {"fetched", "generic", "none"} and set(runs["S"]["eval"]) == {"none"}
    ev = runs["S+mem"]["eval"]["fetched"]
    assert set(ev["buckets"]) == {"0", "1-9", "10-99", "100-999", ">=1000"}
    assert sum(b["n"] for b in ev["buckets"].values()) == 6 * 2          # 6 fact tasks x eval_limit
    assert ev["heldout_ppl"] > 1 and ev["heldout_word_ppl"] > 1 and ev["avg_sk"] is not None
    assert runs["S+mem"]["fit_heldout_ppl"]["fetched"] > 1
    assert len(summary["prompt_routing"]["same_node_by_level"]) == 3
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"summary.json", "table.md", "fig1_accuracy_by_frequency.png",
                                              "eval_reports.json.xz"}
    assert "| S+mem | fetched | 1 |" in (out / "table.md").read_text()

    models = tmp_path / "work" / "runs"
    # (iv) trains only the generic block: every tree block's down projection is still its zero init
    generic_bank = models / "demo-S-generic-s0" / "model" / "bank"
    assert all(not load_file(str(generic_bank / f"l{i}.safetensors"))["w3"].any() for i in range(3))
    assert load_file(str(generic_bank / "generic.safetensors"))["w3"].any()
    # (v) keeps the anchor of (i) exactly
    a = load_file(str(models / "demo-S-s0" / "model" / "anchor.safetensors"))
    b = load_file(str(models / "demo-S-posthoc-s0" / "model" / "anchor.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    merged = merge([out / "summary.json", out / "summary.json"], tmp_path / "merged")
    assert "| S+mem | fetched | 2 |" in (tmp_path / "merged" / "table.md").read_text()
    assert (tmp_path / "merged" / "fig1_accuracy_by_frequency.png").stat().st_size > 10_000
    assert {c["label"] for c in merged["curves"]} >= {"S", "S+mem (fetched)", "S+mem (generic)"}

    # the driver again on the same --work: the existing run of S is replaced (fit --overwrite), not refused
    again = run_part(_opts(demo_dir, tmp_path, out=tmp_path / "again", runs=("S",), epochs=0.01))
    assert again["runs"]["S"]["status"] == "ok" and "eval" in again["runs"]["S"]
    assert not list((models / "demo-S-s0").glob(".previous-*"))     # the replaced run is gone once it succeeded


def test_gpu_script_declares_the_installed_entry_points(tmp_path):
    """On the GPU machine hmlm is not pip-installed; the driver declares the same plugins from pyproject.toml."""
    declared = md.PathDistribution(_gpu_script().write_dist_info(tmp_path))
    key = lambda d: {(e.group, e.name, e.value) for e in d.entry_points if e.group.startswith("hmlm.")}  # noqa: E731
    assert key(declared) == key(md.distribution("hmlm")) and declared.metadata["Name"] == "hmlm"

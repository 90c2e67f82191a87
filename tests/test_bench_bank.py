"""Every path benchmarks/gpu_bank.sh exercises, at CPU size: `hmlm bench fetch` per tier plan, `hmlm bench train
--tiers --branching`, and `hmlm inspect` on a trained model."""
from __future__ import annotations

import json

from conftest import REPO
from hmlm.cli import main

TINY = ["anchor.options.preset=tiny", "anchor.options.n_layers=2", "anchor.options.d_model=32",
        "anchor.options.n_heads=2", "anchor.options.head_dim=16", "anchor.options.ffn_dim=64", "anchor.vocab_size=128", "index.router.branching=4", "index.router.levels=3",
        "memory.sizes=[8,4,2]", "memory.dtype=bfloat16", "data.seq_len=16", "trainer.batch_size=4",
        "memory.io_threads=2"]


def test_bench_fetch_every_tier_plan(tmp_path, capsys):
    out = tmp_path / "fetch.json"
    code = main(["bench", "fetch", "--recipe", str(REPO / "recipes/quickstart.yaml"), *TINY,
                 "--tiers", "device;host;host,host,disk", "--prompts", "4", "--disk-dir", str(tmp_path / "d"),
                 "--out", str(out), "--profile", str(tmp_path / "prof")])
    assert code == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())
    # the warm fetch of each plan profiled: a table naming the fetch's time
    warm = [r for r in rows if r["phase"] == "warm"]
    assert all(r["profile"]["steps"] == 10 and r["profile"]["wall_ms_per_step"] > 0 for r in warm)
    assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == [
        "fetch_device.txt", "fetch_host_host_disk_staged.txt", "fetch_host_staged.txt"]
    assert [(r["tiers"], r["phase"]) for r in rows] == [(t, p) for t in ("device,device,device", "host,host,host",
                                                                         "host,host,disk")
                                                        for p in ("cold", "warm", "cached")]
    cached = [r for r in rows if r["phase"] == "cached" and r["tiers"] != "device,device,device"]
    assert all(r["cache_hits"] > 0 for r in cached)   # shallow blocks recur across prompts
    assert all(r["fetch_ms"]["p50"] > 0 and r["fetched_params"] > 0 for r in rows)


def test_bench_train_tiers_and_bank_size_sweep(tmp_path, capsys):
    out = tmp_path / "train.json"
    code = main(["bench", "train", "--recipe", str(REPO / "recipes/quickstart.yaml"), *TINY,
                 f"memory.disk_dir={tmp_path / 'd'}", "--stores", "", "--tiers", "auto;host;device,host,disk",
                 "--branching", "2,4", "--steps", "2", "--warmup", "1", "--out", str(out), "--batches", "4,2"])
    assert code == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())
    # every configuration built once and timed at both batch sizes, each ratio against the anchor at its batch
    assert [(r["tiers"], r["batch"]) for r in rows] == [
        (t, b) for t in (None, "device,device,device", "host,host,host", "device,host,disk", "device,device,device",
                         "device,device,device") for b in (4, 2)]
    anchor = {r["batch"]: r["tokens_per_s"] for r in rows[:2]}
    assert all(r["ratio_vs_anchor"] == round(r["tokens_per_s"] / anchor[r["batch"]], 3) for r in rows)
    rows = [r for r in rows if r["batch"] == 4]
    sweep = [r for r in rows if r.get("sweep")]
    assert [r["branching"] for r in sweep] == [2, 4] and sweep[0]["bank_params"] < sweep[1]["bank_params"]
    assert sweep[0]["fetched_params"] == sweep[1]["fetched_params"]
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_inspect_reports_levels_and_plots_usage(tiny_model_dir, tmp_path, capsys):
    png, js = tmp_path / "usage.png", tmp_path / "report.json"
    code = main(["inspect", str(tiny_model_dir.parent), "--out", str(png), "--json", str(js)])
    out = capsys.readouterr().out
    assert code == 0 and png.stat().st_size > 1000
    report = json.loads(js.read_text())
    levels = {e["key"]: e for e in report["levels"]}
    assert set(levels) == {"l0", "l1", "l2", "generic"}
    assert levels["l0"]["nodes"] == 3 and levels["l2"]["nodes"] == 27
    # 20 steps of 4 sequences: every step updates at least one block of each level
    assert levels["l0"]["updates_total"] >= 20 and levels["l2"]["blocks_updated"] > 0
    assert "docs" in levels["l0"] and "l2" in out
    assert main(["inspect", str(tmp_path)]) == 2


def test_bench_train_profile_names_every_region(tmp_path, capsys):
    """--profile: each row gets a table file and a summary whose regions are the shared TrainStep's, so a profile of
    the bench is a profile of what fit runs; the timing itself is taken before the profiler starts."""
    out, prof = tmp_path / "train.json", tmp_path / "prof"
    code = main(["bench", "train", "--recipe", str(REPO / "recipes/quickstart.yaml"), *TINY, "--stores", "device",
                 "--steps", "2", "--warmup", "1", "--out", str(out), "--profile", str(prof)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())
    assert [r["store"] for r in rows] == [None, "device"]
    anchor, memory = (r["profile"] for r in rows)
    assert set(anchor["regions"]) == {"hmlm.fetch", "hmlm.forward_loss", "hmlm.backward", "hmlm.clip", "hmlm.optim"}
    assert set(memory["regions"]) == set(anchor["regions"]) | {"hmlm.bank_optim"}
    assert memory["regions"]["hmlm.bank_optim"]["host_ms"] > 0
    assert anchor["device_busy_fraction"] is None  # no CUDA device: no device time to claim
    for r in rows:
        text = (prof / r["profile"]["table"]).read_text()
        assert text.startswith("profile of ") and "hmlm.backward" in text

"""benchmarks/gpu_bank.py (the issue-9 rows on the GPU machine) at CPU size: every row kind runs, the outputs are
written, ratios are against the anchor at the same batch, the disk tier's files are removed, and a budget that cannot
hold the rows skips them with the reason instead of running over."""
from __future__ import annotations

import json

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def gpu_bank():
    return load_benchmark("gpu_bank")


def test_tiny_rows_every_tier_and_bank_io(gpu_bank, tmp_path, capsys):
    disk = tmp_path / "disk"
    code = gpu_bank.main(["--out", str(tmp_path / "out"), "--tiny", "--disk-dir", str(disk), "--steps", "1",
                          "--warmup", "1", "--batches", "2,1", "--plans", "device,host,disk@bf16;host"])
    assert code == 0
    result = json.loads((tmp_path / "out" / "bank_rows.json").read_text())
    rows = result["train"]
    assert [(r["tiers"], r["batch"]) for r in rows] == [(None, 2), (None, 1), ("device,host,disk", 2),
                                                        ("device,host,disk", 1), ("host,host,host", 2),
                                                        ("host,host,host", 1)]
    assert [r["optim_state"] for r in rows[2:]] == ["bf16", "bf16", "fp32", "fp32"]
    assert all(r["tokens_per_s"] > 0 and not r.get("skipped") for r in rows)
    for r in rows[2:]:  # against the anchor row of the same batch size
        anchor = next(a for a in rows[:2] if a["batch"] == r["batch"])
        assert r["ratio_vs_anchor"] == round(r["tokens_per_s"] / anchor["tokens_per_s"], 3)
    assert rows[2]["bank_bytes_by_tier"]["disk"]["param_bytes"] > 0
    [io] = result["bank_io"]
    assert io["bank_bytes"] > 0 and io["export_s"] >= 0
    md = (tmp_path / "out" / "bank.md").read_text()
    assert "| 2 | anchor only |" in md and "tiers device,host,disk" in md and "Bank I/O" in md
    assert "skipped" not in md
    assert not disk.exists()


def test_a_spent_budget_skips_rows_and_says_so(gpu_bank, tmp_path):
    code = gpu_bank.main(["--out", str(tmp_path), "--tiny", "--budget-s", "0", "--disk-dir", str(tmp_path / "d"),
                          "--batches", "2", "--plans", "host"])
    assert code == 0
    result = json.loads((tmp_path / "bank_rows.json").read_text())
    assert result["train"] and all(r.get("skipped") and not r.get("tokens_per_s") for r in result["train"])
    assert all(r.get("skipped") for r in result["bank_io"])
    assert "budget ran out" in (tmp_path / "bank.md").read_text()


def test_dry_run_lists_rows_bytes_and_estimates(gpu_bank, tmp_path, capsys):
    assert gpu_bank.main(["--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "bank 4,624,220,160 parameters" in out and "fetched 18,063,360" in out
    assert "row device,device,host:" in out and "host 35.2 GB" in out   # level 3 with fp32 moments
    assert "row disk@bf16:" in out and "disk 27.7 GB" in out
    assert not (tmp_path / "bank_rows.json").exists()

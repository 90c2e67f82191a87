"""benchmarks/gpu_ds.sh --dry-run: every call the GPU run makes parses its recipe overrides and plans its subtrees
(the 4-GPU plan of the 160M and 1.4B configurations), and the report is written even when no row was measured."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_ds_script_dry_run(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "benchmarks/gpu_ds.sh", str(tmp_path), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    times = (tmp_path / "times.txt").read_text()
    for name in ("160m_ddp", "160m_ddp_bf16", "160m_deepspeed_stage_1", "160m_deepspeed_stage_2", "1.4b_deepspeed_stage_2"):
        assert f"== {name}: exit 0" in times
    # the 1.4B configuration: a 21.1B bank, a quarter per rank on 4 GPUs (level-1 subtrees, k=16)
    log = (tmp_path / "1.4b_deepspeed_stage_2.log").read_text()
    assert "world=4" in log and "bank_params=21139292160" in log and "plan_level=1" in log
    assert "not measured" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.json").read_text().strip() == "[]"

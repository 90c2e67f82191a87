"""benchmarks/gpu_bank_ds.sh at CPU size (GPU_BANK_DS_TINY=1): it reports the compilers and libaio, tries to build
DeepSpeed's ops, and writes every row of its train and zero3 groups -- measured where the op is there, an error row
saying why where it is not (CI has no DeepSpeed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bank_ds_script_tiny(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "GPU_BANK_DS_TINY": "1",
           "TMPDIR": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_bank_ds.sh", str(out), "600", "train,zero3,host160"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tools = (out / "tools.txt").read_text()
    assert "g++:" in tools and "ninja:" in tools and "/usr/include/libaio.h:" in tools
    assert (out / "build_async_io.log").exists() and (out / "build_cpu_adam.log").exists()
    rows = json.loads((out / "train" / "bank_rows.json").read_text())["train"]
    assert [r["config"].split(",")[0] for r in rows][:1] == ["anchor only"] and len(rows) == 5
    by = {(r.get("disk_io"), r.get("host_update")): r for r in rows[1:] if not r.get("error")}
    # the thread-pool disk row and the GPU update are measured everywhere
    assert by[("threads", None)]["tokens_per_s"] > 0 and by[(None, "gpu")]["tokens_per_s"] > 0
    for r in rows[1:]:
        if r.get("error"):   # an op that is not here says why: no DeepSpeed, or (a clean clone) no unpacked libaio
            assert any(why in r["error"].lower() for why in ("deepspeed", "libaio")), r["error"]
        else:
            assert r["tokens_per_s"] > 0 and r["ratio_vs_anchor"] is not None
    host = json.loads((out / "host160" / "bank_rows.json").read_text())["train"]
    # staged and UVA reads (UVA is the staged read on the CPU) updated on the GPU path, then the CPU Adam row
    assert [(r.get("host_update"), r.get("host_read")) for r in host[1:] if not r.get("error")][:2] == \
        [("gpu", "staged"), ("gpu", "staged")]
    assert all(r.get("tokens_per_s") or "deepspeed" in r["error"].lower() for r in host[1:]), host
    zero3 = json.loads((out / "zero3" / "bank_rows.json").read_text())["train"]
    assert zero3[-1].get("tokens_per_s") or "deepspeed" in zero3[-1]["error"].lower(), zero3[-1]
    assert "gpu_bank_ds.sh:" in proc.stdout and not (tmp_path / "hmlm-gpu-bank-ds").exists()

"""benchmarks/gpu_speed.sh runs on the GPU machine in one call that can't be repeated cheaply: every hmlm command it
runs is run here first, on CPU at a tiny size, with its own flags (compile, compile modes, documents, stores)."""
from __future__ import annotations

import json
import shlex
import subprocess

import pytest
import torch

from conftest import REPO
from hmlm.cli import main

# shrink the 160M/410M shapes (later dotlist overrides win) and the step counts (so do later flags)
TINY = ["anchor.n_layers=2", "anchor.d_model=32", "anchor.n_heads=2", "anchor.head_dim=16", "anchor.ffn_dim=64",
        "anchor.vocab_size=128", "data.seq_len=32", "trainer.batch_size=2", "index.router.branching=2",
        "memory.sizes=[4,2,1,0]"]


def tiny(argv: list[str], out) -> list[str]:
    """The command with TINY after its own overrides (positional arguments must stay together)."""
    first_flag = next(i for i, a in enumerate(argv) if i > 3 and a.startswith("--"))
    flags = argv[first_flag:argv.index("--out")]
    return argv[:first_flag] + TINY + flags + ["--steps", "1", "--warmup", "1", "--out", str(out)]


def script_commands(tmp_path) -> list[list[str]]:
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_speed.sh"), str(tmp_path / "gpu"), "--dry-run"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    return [shlex.split(line)[1:] for line in out.splitlines() if line.startswith("hmlm ")]


def test_every_gpu_script_command_runs_on_cpu(tmp_path, monkeypatch):
    commands = script_commands(tmp_path)
    assert len(commands) == 8 and any("--compile" in c for c in commands)
    assert any("anchor.preset=410m" in c for c in commands) and any("data.doc_mask=true" in c for c in commands)
    real_compile = torch.compile
    # dynamo's capture and AOTAutograd, not inductor's code generation (minutes on a 2-core CPU)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager"))
    monkeypatch.chdir(REPO)
    for argv in commands:
        out = tmp_path / "row.json"
        assert main(tiny(argv, out)) == 0, argv
        rows = json.loads(out.read_text())
        assert rows and all("tokens_per_s" in r for r in rows), rows
        assert ("--compile" in argv) == rows[0]["config"].endswith("compiled")


def test_dry_run_writes_nothing(tmp_path):
    script_commands(tmp_path)
    assert not (tmp_path / "gpu").exists()


@pytest.mark.parametrize("preset, tied", [("160m", True), ("410m", False)])
def test_later_overrides_win(preset, tied):
    from hmlm.config import load_recipe

    r = load_recipe(REPO / "recipes" / "quickstart.yaml", ["anchor.preset=160m", f"anchor.preset={preset}"])
    assert r.anchor.preset == preset

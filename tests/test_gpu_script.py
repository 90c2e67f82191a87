"""benchmarks/gpu_speed.sh runs on the GPU machine in one call that can't be repeated cheaply: every hmlm command it
runs is run here first, on CPU at a tiny size, with its own flags (compile, compile modes, documents, stores)."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, load_benchmark
from hmlm.cli import main



def table_main(argv: list[str]) -> int:
    """benchmarks/speed_table.py's main (a script, not a module of the package)."""
    return load_benchmark("speed_table").main(argv)


# shrink the 160M/410M shapes (later dotlist overrides win) and the step counts (so do later flags)
TINY = ["anchor.options.n_layers=2", "anchor.options.d_model=32", "anchor.options.n_heads=2", "anchor.options.head_dim=16", "anchor.options.ffn_dim=64",
        "anchor.vocab_size=128", "data.seq_len=32", "trainer.batch_size=2", "index.router.branching=2",
        "memory.sizes=[4,2,1,0]"]


def tiny(argv: list[str]) -> list[str]:
    """The command with TINY after its own overrides (positional arguments must stay together), same --out."""
    first_flag = next(i for i, a in enumerate(argv) if i > 3 and a.startswith("--"))
    at = argv.index("--out")
    return argv[:first_flag] + TINY + argv[first_flag:at] + ["--steps", "1", "--warmup", "1"] + argv[at:]


def script_lines(out_dir, *args: str) -> list[str]:
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_speed.sh"), str(out_dir), "--dry-run", *args],
                          capture_output=True, text=True, check=True, cwd=REPO).stdout.splitlines()


# stands in for ../shared/bench/reference_160m.py (CUDA only, not part of hmlm): its result dict R, its row lines
# (`name tokens/s "tok/s" mfu "MFU"`) printed as each row finishes, and its JSON at the end
STAND_IN_REFERENCE = """
import json
R = {"ref_params": 1000}

def record(name, tok_s, mfu):
    R[name + "_tok_s"] = tok_s
    R[name + "_mfu"] = mfu
    print(name, round(tok_s), "tok/s", round(mfu, 3), "MFU", flush=True)

print("2.x", "a device")
record("ref_eager", 100.0, 0.1)
record("ref_compiled", 400.0, 0.4)
record("mem_given_eager", 90.0, 0.09)
print(json.dumps(R))
"""


def test_every_gpu_script_command_runs_on_cpu_and_makes_the_table(tmp_path, monkeypatch):
    out_dir = tmp_path / "gpu"
    lines = script_lines(out_dir, "--part", "all")
    # the bench commands as `hmlm ...` argv (the script runs them as `python -m hmlm.cli ...`)
    commands = [shlex.split(line)[3:] for line in lines if " -m hmlm.cli " in line]
    assert len(commands) == 9 and any("--compile" in c for c in commands)
    assert any("anchor.options.preset=410m" in c for c in commands) and any("data.doc_mask=true" in c for c in commands)
    assert not out_dir.exists()  # a dry run writes nothing
    real_compile = torch.compile
    # dynamo's capture and AOTAutograd, not inductor's code generation (minutes on a 2-core CPU)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager"))
    monkeypatch.chdir(REPO)
    for argv in commands[:3]:  # part 1 (the rest below, without keeping their rows: the table is part 1's)
        assert main(tiny(argv)) == 0, argv
        rows = json.loads(Path(argv[argv.index("--out") + 1]).read_text())
        assert rows and all("tokens_per_s" in r for r in rows), rows
        assert ("--compile" in argv) == rows[0]["config"].endswith("compiled")
    for argv in commands[3:]:
        scratch = tiny(argv)
        scratch[-1] = str(tmp_path / "scratch.json")
        assert main(scratch) == 0, argv

    # the reference runner, on the stand-in, ended after ref_compiled as part 1 does
    reference = tmp_path / "reference.py"
    reference.write_text(STAND_IN_REFERENCE)
    ref_line = next(line for line in lines if "reference_rows.py" in line and "ref_b8.json" in line)
    _env, env_b, _python, runner, _path, ref_out, *flags = shlex.split(ref_line)
    assert _env == "env" and env_b == "B=8" and flags == ["--stop-after", "ref_compiled"]
    monkeypatch.setenv("B", "2")  # TINY's batch size, so that the table sets the two side by side
    done = subprocess.run([sys.executable, runner, str(reference), ref_out, *flags], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert "mem_given_eager" not in done.stdout  # stopped after the row asked for
    ref_rows = json.loads(Path(ref_out).read_text())
    assert [(r["config"], r["tokens_per_s"], r["compiled"], r["batch"]) for r in ref_rows] == [
        ("ref_eager", 100.0, False, 2), ("ref_compiled", 400.0, True, 2)]

    table_line = lines[-1]
    assert table_line == f"python benchmarks/speed_table.py {out_dir}"
    assert table_main([str(out_dir)]) == 0
    md = (out_dir / "speed.md").read_text()
    summary = json.loads((out_dir / "speed.json").read_text())
    (shape,) = [v for k, v in summary["shapes"].items() if k.endswith("batch 2")]  # TINY's batch size
    ratios, rows = shape["ratios"], shape["rows"]
    # the ratios are the rows' own tokens/s, reference and hmlm from the same call
    assert ratios["hmlm_vs_reference_anchor_eager"] == pytest.approx(
        rows["hmlm"]["tokens_per_s"] / 100.0, rel=1e-2)
    assert ratios["hmlm_vs_reference_anchor_compiled"] == pytest.approx(
        rows["hmlm, compiled"]["tokens_per_s"] / 400.0, rel=1e-2)
    assert ratios["hmlm_memory_step_time_vs_anchor_eager"] == pytest.approx(
        rows["hmlm"]["tokens_per_s"] / rows["hmlm + memory"]["tokens_per_s"], rel=1e-2)
    for text in ("| plain PyTorch reference, anchor alone | 100 (10.0%) | 400 (40.0%) |", "ratio hmlm / reference",
                 "hmlm + memory (256,64,16,0), device store"):
        assert text in md, md


def test_reference_runner_names_a_missing_reference(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/reference_rows.py", str(tmp_path / "nope.py"),
                           str(tmp_path / "r.json")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "nope.py" in done.stderr and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("preset, tied", [("160m", True), ("410m", False)])
def test_later_overrides_win(preset, tied):
    from hmlm.config import load_recipe

    r = load_recipe(REPO / "recipes" / "quickstart.yaml",
                    ["anchor.options.preset=160m", f"anchor.options.preset={preset}"])
    assert r.anchor.options["preset"] == preset


# stands in for the GPU machine's python: import checks pass, every command it is given is recorded, and the rows
# it is asked for are written (the table is built by the real python)
STAND_IN_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$STAND_IN_LOG"
case "$1" in
  -c) exit 0 ;;
  benchmarks/speed_table.py) exec "$REAL_PYTHON" "$@" ;;
esac
for ((i = 1; i <= $#; i++)); do
  if [ "${!i}" = "--out" ]; then j=$((i + 1)); echo '[]' > "${!j}"; fi
done
"""


def test_the_real_run_executes_every_part1_command(tmp_path):
    """Not a dry run: the commands go through `timeout` as programs (a shell function there exits 127 and the call
    measures nothing, which the dry run alone cannot show)."""
    python = tmp_path / "python"
    python.write_text(STAND_IN_PYTHON)
    python.chmod(0o755)
    reference = tmp_path / "reference.py"
    reference.write_text(STAND_IN_REFERENCE)
    log = tmp_path / "calls.log"
    out_dir = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(python), "STAND_IN_LOG": str(log), "REAL_PYTHON": sys.executable,
           "HMLM_GPU_BUDGET_S": "600"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_speed.sh"), str(out_dir), str(reference)],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    summary = (out_dir / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in summary] == [["ref_b8", "rc=0"], ["hmlm_160m_b8_eager", "rc=0"],
                                                      ["hmlm_160m_b8_compiled", "rc=0"]], summary
    calls = log.read_text()
    assert "benchmarks/reference_rows.py" in calls and calls.count("-m hmlm.cli bench train") == 2


def test_part5_runs_cuda_graph_rows_and_the_table_gives_their_memory_ratio(tmp_path):
    """Part 5 (not in "all"): the reference at batch 16 and hmlm's reduce-overhead rows, anchor alone and + memory;
    the table sets each memory variant against the anchor alone of the same variant and file."""
    lines = script_lines(tmp_path / "gpu", "--part", "5")
    commands = [shlex.split(line)[3:] for line in lines if " -m hmlm.cli " in line]
    assert len(commands) == 2 and any("ref_b16.json" in line for line in lines)
    assert all("trainer.compile_mode=reduce-overhead" in c and "--compile" in c and c[c.index("--stores") + 1]
               == "device" for c in commands)
    out = tmp_path / "rows"
    out.mkdir()
    common = {"batch": 16, "seq_len": 2048, "compile_mode": "reduce-overhead", "doc_mask": False}
    (out / "hmlm_x.json").write_text(json.dumps([
        {**common, "config": "anchor only, compiled", "anchor_params": 100, "tokens_per_s": 300.0, "mfu": 0.4},
        {**common, "config": "anchor + memory (device store), compiled", "anchor_params": 100, "tokens_per_s": 250.0,
         "mfu": 0.36}]))
    (out / "ref_b16.json").write_text(json.dumps([
        {"model": "reference", "memory": False, "compiled": True, "config": "ref_compiled", "params": 100,
         "batch": 16, "seq_len": 2048, "tokens_per_s": 200.0, "mfu": 0.3}]))
    assert table_main([str(out)]) == 0
    md = (out / "speed.md").read_text()
    assert "| hmlm + memory (256,64,16,0), device store, compiled, compile_mode=reduce-overhead | 250 (36.0%) | - | " \
           "1.25 | 1.20 |" in md, md
    assert "| hmlm anchor alone, compiled, compile_mode=reduce-overhead | 300 (40.0%) | - | 1.50 | - |" in md

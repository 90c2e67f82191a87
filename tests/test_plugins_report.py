"""benchmarks/plugins_report.py: the example plugins' table comes from the files the runs wrote, nothing else."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _report_module():
    spec = importlib.util.spec_from_file_location("plugins_report", REPO / "benchmarks" / "plugins_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _model(path: Path, memory: str, router: str) -> str:
    _write(path / "model.json", {"recipe": {"memory": {"type": memory, "sizes": [2, 1]},
                                            "index": {"router": {"name": router}}}})
    return str(path)


def test_table_and_plot_from_the_run_files(tmp_path):
    ffn, pkm = _model(tmp_path / "types/ffn/model", "ffn", "hkmeans"), _model(tmp_path / "types/pkm/model", "pkm",
                                                                            "hkmeans")
    rows = [{"type": "ffn", "sizes": [64, 32], "fetched_params": 172032, "bank_params": 10, "train_seconds": 60.4,
             "heldout_perplexity": {"fetched": 101.25, "generic": 120.5, "none": 125.0}, "model_dir": ffn,
             "averages": {"fetched": {"SK": 0.25}, "none": {"SK": 0.0}}},
            {"type": "pkm", "sizes": [10, 5], "fetched_params": 174080, "bank_params": 10, "train_seconds": 70.0,
             "heldout_perplexity": {"fetched": 110.0, "generic": 118.0, "none": 119.0}, "model_dir": pkm,
             "averages": {"fetched": {"SK": None}}}]
    _write(tmp_path / "types/memory_types.json", {"recipe": "quickstart", "types": rows})
    rp = _model(tmp_path / "randproj/model", "ffn", "randproj")
    _write(tmp_path / "randproj/fit_result.json", {"model_dir": rp, "seconds": 61.0,
                                                   "heldout_perplexity": {"fetched": 108.5, "generic": 121.0,
                                                                          "none": 124.0}})
    _write(tmp_path / "router-eval/report.json", {"models": [{"modes": {"fetched": {"averages": {"SK": 0.125}}}}]})
    (tmp_path / "machine-types.txt").write_text("2026-11-26T14:00:00Z\n2\nno GPU\n")

    assert _report_module().main([str(tmp_path)]) == 0
    table = (tmp_path / "plugins.md").read_text()
    assert "| `ffn` | hkmeans | (64, 32) | 172,032 | 101.25 | 120.50 | 125.00 | 1.235 | 25.0% | 0.0% |" in table
    assert "| `pkm` | hkmeans | (10, 5) | 174,080 | 110.00 | 118.00 | 119.00 | 1.082 | -% | -% |" in table
    assert "| `ffn + randproj` | randproj | (2, 1) | - | 108.50 | 121.00 | 124.00 | 1.143 | 12.5% | -% |" in table
    assert "machine-types: 2026-11-26T14:00:00Z; 2; no GPU" in table
    assert json.loads((tmp_path / "plugins.json").read_text())["rows"][2]["router"] == "randproj"
    assert (tmp_path / "plugins.png").stat().st_size > 0


def test_model_dirs_recorded_on_another_machine_are_found_under_the_out_dir(tmp_path):
    mod = _report_module()
    local = _model(tmp_path / "types/ffn/model", "ffn", "hkmeans")
    assert mod._here(tmp_path, "/gpu/out/types/ffn/model") == Path(local)
    assert mod._router_name(mod._model_meta(tmp_path, "/gpu/out/types/ffn/model")) == "hkmeans"


def test_nothing_to_report_is_an_error(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "plugins_report.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "types part missing" in run.stderr and "router part missing" in run.stderr
    assert not (tmp_path / "plugins.md").exists()


def test_script_refuses_an_unknown_part(tmp_path):
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_plugins.sh"), str(tmp_path), "both"],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert run.returncode == 2 and "types, router or report" in run.stderr

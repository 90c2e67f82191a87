"""scripts/quickstart.sh stays re-runnable under fit's "never replace a run without --overwrite" rule: it passes
--overwrite itself (saying so when an earlier run is there), and leaves the choice to the user's own --resume or
--overwrite. Run on a copy of the script whose set-up step and `hmlm` are stand-ins that record their arguments."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quickstart.sh"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / "quickstart.sh")
    (tmp_path / "scripts" / "setup-env.sh").write_text("echo setup\n")
    hmlm = tmp_path / ".venv" / "bin" / "hmlm"
    hmlm.parent.mkdir(parents=True)
    hmlm.write_text('#!/usr/bin/env bash\necho "hmlm $*"\n')
    hmlm.chmod(0o755)
    return tmp_path


def _run(checkout: Path, *args: str) -> list[str]:
    out = subprocess.run(["bash", str(checkout / "scripts" / "quickstart.sh"), *args], cwd="/", check=True,
                         capture_output=True, text=True).stdout
    return out.splitlines()


def test_a_first_run_trains_with_overwrite_and_says_nothing_about_an_earlier_run(checkout):
    assert _run(checkout, "trainer.max_steps=5") == [
        "setup", "hmlm fit --recipe recipes/quickstart.yaml --overwrite trainer.max_steps=5"]


@pytest.mark.parametrize("entry", ["model", "checkpoints"])
def test_a_second_run_trains_over_the_first_and_says_how_to_continue_it_instead(checkout, entry):
    (checkout / "runs" / "quickstart" / entry).mkdir(parents=True)
    lines = _run(checkout)
    assert "runs/quickstart holds an earlier run" in lines[1] and "quickstart.sh --resume" in lines[1]
    assert lines[-1] == "hmlm fit --recipe recipes/quickstart.yaml --overwrite"


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_the_users_own_resume_or_overwrite_is_passed_on_alone(checkout, flag):
    (checkout / "runs" / "quickstart" / "model").mkdir(parents=True)
    assert _run(checkout, flag) == ["setup", f"hmlm fit --recipe recipes/quickstart.yaml {flag}"]

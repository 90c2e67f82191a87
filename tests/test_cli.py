"""The `hmlm` command: recipe errors (exit 2, file and key named), --print-config, --dry-run, plugins, quickstart."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from hmlm.cli import main
from hmlm.config import RecipeError, load_recipe


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())  # rich wraps long lines; compare on normalised whitespace


@pytest.mark.parametrize("body, key, expected", [
    ("name: x\ntrainer: {max_stepz: 3}\n", "trainer.max_stepz", "known keys under `trainer`"),
    ("name: x\ntrainer: {max_steps: many}\n", "trainer.max_steps", "int"),
    ("name: x\nmemory: {sizes: [1, two]}\n", "memory.sizes[1]", "list[int]"),
    ("name: x\ntrainer: {mode: sideways}\n", "trainer.mode", "anchor, memory, cotrain, scratch"),
    ("name: x\nmemory: {placement: 'last:abc'}\n", "memory.placement", "integer"),
    ("seed: 1\n", "name", "missing"),
])
def test_recipe_errors_name_file_and_key(tmp_path, capsys, body, key, expected):
    recipe = write(tmp_path / "bad.yaml", body)
    code, _, err = run(capsys, "fit", "--recipe", str(recipe), "--print-config")
    assert code == 2
    assert str(recipe) in err and f"`{key}`" in err and expected in err
    assert "Traceback" not in err


def test_error_in_base_file_names_the_base(tmp_path):
    write(tmp_path / "base.yaml", "name: b\ndata: {seq_lenn: 3}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nseed: 3\n")
    with pytest.raises(RecipeError, match=r"base\.yaml.*data\.seq_lenn"):
        load_recipe(child)


def test_base_extension_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "name: b\nseed: 1\ntrainer: {max_steps: 10, batch_size: 3}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\ntrainer: {max_steps: 20}\n")
    r = load_recipe(child, ["trainer.batch_size=5", "memory.sizes=[4,2]"])
    assert (r.name, r.seed, r.trainer.max_steps, r.trainer.batch_size, r.memory.sizes) == ("b", 1, 20, 5, [4, 2])
    assert r.out_dir == "runs/b" and r.index.dir == "runs/b/index"


def test_bad_override_and_missing_file(tmp_path, capsys):
    code, _, err = run(capsys, "fit", "--recipe", str(REPO / "recipes/quickstart.yaml"), "trainer.nope=1",
                       "--print-config")
    assert code == 2 and "trainer.nope" in err and "command-line override" in err
    code, _, err = run(capsys, "fit", "--recipe", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml" in err and "not found" in err


def test_unknown_plugin_lists_known_names(tmp_path, capsys):
    recipe = write(tmp_path / "r.yaml", "name: x\nmemory: {type: fnn}\n")
    code, _, err = run(capsys, "fit", "--recipe", str(recipe), "--dry-run")
    assert code == 2 and "fnn" in err and "ffn" in err


def test_print_config_is_the_resolved_recipe(capsys):
    code, out, _ = run(capsys, "fit", "--recipe", str(REPO / "recipes/quickstart.yaml"), "trainer.max_steps=7",
                       "--print-config")
    assert code == 0
    assert "max_steps: 7" in out and "dir: runs/quickstart/index" in out


def test_dry_run_prints_paper_sizes(capsys):
    code, out, _ = run(capsys, "fit", "--recipe", str(REPO / "recipes/quickstart.yaml"), "--dry-run",
                       "anchor.preset=160m", "anchor.vocab_size=50432", "index.router.branching=16",
                       "index.router.levels=4", "memory.sizes=[256,64,16,0]", "memory.dtype=bfloat16")
    assert code == 0
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert lines["anchor parameters"] == "163510016"
    assert lines["fetched memory parameters per sequence"] == "18063360"
    assert lines["bank parameters"] == "4624220160"
    assert lines["bank bytes (device)"] == str(4624220160 * 2)


def test_plugins_lists_builtins(capsys):
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    for name in ("openlm", "ffn", "hkmeans", "minilm", "hashing", "device", "host"):
        assert name in out


def test_quickstart_recipe_through_cli(tmp_path, capsys):
    """The real quickstart recipe (MiniLM embedder, bundled corpus) on a slice of the corpus for a few steps."""
    out_dir = tmp_path / "qs"
    code, out, err = run(capsys, "fit", "--recipe", str(REPO / "recipes/quickstart.yaml"), f"out_dir={out_dir}",
                         "data.max_docs=600", "trainer.max_steps=4", "trainer.val_every=2", "trainer.val_batches=2",
                         "trainer.ckpt_every=2", "index.router.branching=4")
    assert code == 0, err
    result = json.loads((out_dir / "fit_result.json").read_text())
    assert result["steps"] == 4
    assert set(result["heldout_perplexity"]) == {"fetched", "generic", "none"}
    assert (out_dir / "model" / "model.json").is_file()
    assert (out_dir / "checkpoints" / "last.ckpt").is_file()
    index = json.loads((out_dir / "index" / "index.json").read_text())
    assert index["embedder"]["name"] == "minilm" and index["counts"]["documents"] == 600
    # the quickstart prints no third-party noise: no tqdm bar of transformers' weight loading, no warnings
    assert "Loading weights" not in out + err and "Warning" not in out + err, err


def test_corrupt_index_and_checkpoint_are_clear_errors(tiny_recipe, tmp_path, capsys):
    import yaml

    from hmlm.config import to_dict
    from hmlm.train.fit import fit

    recipe = tiny_recipe(**{"out_dir": str(tmp_path / "run"), "trainer.max_steps": 2, "trainer.ckpt_every": 2})
    fit(recipe, progress=False, final_eval=False)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(to_dict(recipe)), encoding="utf-8")
    # a truncated checkpoint: exit 2, the file named, no traceback (tests/test_bad_inputs.py has the whole battery)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    code, _, err = run(capsys, "fit", "--recipe", str(path), "--resume", "last.ckpt")
    # (stderr may also hold a logging-module complaint about an earlier test's closed capture stream)
    ours = err[err.index("error:"):]
    assert code == 2 and "last.ckpt" in ours and "corrupt" in ours and "Traceback" not in ours
    # a corrupt index.json
    (tmp_path / "run" / "index" / "index.json").write_text("{not json", encoding="utf-8")
    code, _, err = run(capsys, "fit", "--recipe", str(path), "--resume")
    assert code == 2 and "index.json" in err and "corrupt JSON" in err

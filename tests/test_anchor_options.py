"""The anchors own their architecture keys (`anchor.options`); the older schema's keys still load, as those options."""
from __future__ import annotations

import warnings

import pytest

from hmlm.config import RecipeError, load_recipe, recipe_from_dict, to_dict
from hmlm.train.preflight import _current_stamp, model_stamp

OLD_OPENLM = {"name": "openlm", "options": {}, "preset": "tiny", "n_layers": 3, "d_model": 64, "n_heads": None,
              "head_dim": None, "ffn_dim": None, "vocab_size": None, "tied_embeddings": False, "rope_base": None,
              "qk_norm": None, "init_from": None, "hf_model_type": None, "hf_config": {}}


def test_old_recipe_file_is_read_as_options_with_a_warning(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("name: old\nanchor: {preset: 160m, n_layers: 3}\n")
    with pytest.warns(FutureWarning) as caught:
        r = load_recipe(path, ["anchor.d_model=256"])
    said = sorted(str(w.message).split(": ", 1)[1] for w in caught)
    assert said == [f"`anchor.{k}` is now `anchor.options.{k}` (read as such; write the new key)"
                    for k in ("d_model", "n_layers", "preset")]
    assert all(str(w.message).startswith(str(path)) for w in caught)
    assert r.anchor.options == {"preset": "160m", "n_layers": 3, "d_model": 256}


def test_old_model_json_anchor_loads_silently_and_defaults_set_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = recipe_from_dict({"name": "m", "anchor": OLD_OPENLM})
    assert r.anchor.options == {"n_layers": 3, "d_model": 64, "tied_embeddings": False}
    hf = recipe_from_dict({"name": "m", "data": {"doc_mask": False},
                           "anchor": {**OLD_OPENLM, "name": "hf", "n_layers": None, "d_model": None,
                                      "tied_embeddings": None, "hf_model_type": "llama",
                                      "hf_config": {"hidden_size": 32}}})
    assert hf.anchor.options == {"model_type": "llama", "config": {"hidden_size": 32}}


def test_old_and_new_key_together_is_refused(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("name: both\nanchor: {n_layers: 3, options: {n_layers: 4}}\n")
    with pytest.raises(RecipeError, match=r"both.yaml: key `anchor.n_layers`: set both .* `anchor.options.n_layers`"):
        load_recipe(path)


def test_stamp_of_an_older_checkpoint_matches_the_same_model_today():
    recipe = recipe_from_dict({"name": "m", "anchor": {"options": {"n_layers": 3, "d_model": 64,
                                                                   "tied_embeddings": False}}})
    old_stamp = {f"anchor.{k}": v for k, v in OLD_OPENLM.items() if k != "init_from"}
    old_stamp.update({k: v for k, v in model_stamp(recipe).items() if not k.startswith("anchor.")})
    assert _current_stamp(old_stamp) == model_stamp(recipe)
    # a default spelled out stamps like a default left out; another value differs under its full key
    spelled = recipe_from_dict({"name": "m", "anchor": {"options": {"preset": "tiny", "n_layers": 3, "d_model": 64,
                                                                    "tied_embeddings": False}}})
    assert model_stamp(spelled) == model_stamp(recipe)
    assert model_stamp(recipe)["anchor.options.n_layers"] == 3 and "anchor.n_layers" not in model_stamp(recipe)


def test_saved_recipe_round_trips_in_the_new_form():
    r = recipe_from_dict({"name": "m", "anchor": {"options": {"preset": "160m"}}})
    assert set(to_dict(r)["anchor"]) == {"name", "options", "vocab_size", "init_from"}
    assert recipe_from_dict(to_dict(r)) == r

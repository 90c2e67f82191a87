"""hmlm-randproj-router passes hmlm's router conformance kit and takes its options from a recipe mapping."""
from __future__ import annotations

import numpy as np
import pytest

from hmlm.config import RecipeError, RouterConfig
from hmlm.testing import RouterTests, make_plugin
from hmlm.testing.routers import clustered_embeddings


class TestRandProj(RouterTests):
    plugin = "randproj"


class TestRandProjBestOfCandidates(RouterTests):
    plugin = "randproj"
    options = {"candidates": 4, "center": False}


def make(**options):
    return make_plugin("routers", "randproj", "from_config", RouterConfig(branching=4, levels=2), seed=0,
                       options=options)


def test_more_candidates_split_more_evenly():
    x = clustered_embeddings(n=400)
    worst = {c: make(candidates=c).fit(x).fit_stats["levels"][0]["max_share"] for c in (1, 16)}
    assert worst[16] <= worst[1]


def test_options_errors_name_the_key():
    with pytest.raises(RecipeError, match=r"unknown key `index.router.options.candidate`"):
        make(candidate=3)
    with pytest.raises(RecipeError, match=r"key `index.router.options.candidates`: .*"):
        make(candidates="many")
    with pytest.raises(RecipeError, match=r"candidates must be >= 1, got 0"):
        make(candidates=0)


def test_nearby_documents_share_paths_more_than_random_pairs():
    x = clustered_embeddings(n=300)
    paths = make().fit(x).route(x)
    near = np.argsort(x @ x.T, axis=1)[:, -2]   # each document's nearest other document
    same_near = (paths[:, 0] == paths[near, 0]).mean()
    same_random = (paths[:, 0] == np.roll(paths[:, 0], 1)).mean()
    assert same_near > same_random

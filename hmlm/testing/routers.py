"""Conformance checks for routers (hmlm.protocols.Router)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..protocols import Router

K, LEVELS, DIM = 3, 3, 16


def clustered_embeddings(n: int = 240, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Unit vectors around 9 random centres: enough structure for any sensible router to spread documents out."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((9, dim))
    x = centres[rng.integers(0, 9, n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def check_paths(router: Router, paths: np.ndarray, n: int) -> None:
    k, levels = router.branching, router.levels
    assert isinstance(paths, np.ndarray) and paths.dtype == np.int64, \
        f"route must return an int64 numpy array, got {type(paths).__name__} {getattr(paths, 'dtype', '')}"
    assert paths.shape == (n, levels), f"route returned shape {paths.shape}, expected [N, levels] = {(n, levels)}"
    if n == 0:
        return
    for lvl in range(levels):
        assert paths[:, lvl].min() >= 0 and paths[:, lvl].max() < k ** (lvl + 1), \
            f"level {lvl} ids must be in [0, {k ** (lvl + 1)}), got {paths[:, lvl].min()}..{paths[:, lvl].max()}"
    for lvl in range(1, levels):
        bad = np.flatnonzero(paths[:, lvl] // k != paths[:, lvl - 1])
        assert len(bad) == 0, (f"row {bad[0]}: level-{lvl} node {paths[bad[0], lvl]} is not a child of level-{lvl - 1}"
                               f" node {paths[bad[0], lvl - 1]} (children of p are p*k + j)")


def check_router(make: Callable[[int], Router]) -> None:
    """`make(seed)` returns an unfitted router of branching K=3 and LEVELS=3. Runs every router check."""
    x = clustered_embeddings()
    router = make(0).fit(x)
    assert isinstance(router, Router), "fit must return the router (self)"
    assert isinstance(router.name, str) and router.name, "a router has a `name` (its registry name)"
    json.dumps(router.fit_stats)  # fit_stats must be JSON-serialisable (it is stored in index.json)
    paths = router.route(x)
    check_paths(router, paths, len(x))
    assert len(np.unique(paths[:, -1])) > 1, "every document routed to one leaf: the router ignores its input"
    check_paths(router, router.route(x[:0]), 0)

    again = make(0).fit(x)
    np.testing.assert_array_equal(again.route(x), paths, err_msg="two fits with the same seed built different trees")
    np.testing.assert_array_equal(router.route(x), paths, err_msg="route is not a pure function of the fitted state")

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "tree.safetensors"   # what `hmlm index` passes to save
        router.save(file)
        assert file.is_file(), f"save(path) must write the file it is given ({file.name})"
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["tree.safetensors"], \
            "save must write exactly the file it is given (nothing else in the index directory)"
        loaded = type(router).load(file)
        np.testing.assert_array_equal(loaded.route(x), paths, err_msg="a loaded router routes differently")

    check_blocked(router, x, paths)


def check_blocked(router: Router, x: np.ndarray, paths: np.ndarray) -> None:
    k = router.branching
    for lvl in range(router.levels):  # 0-based levels, as the router receives them
        node = int(np.bincount(paths[:, lvl]).argmax())
        blocked_paths = router.route(x, blocked=[(lvl, node)])
        check_paths(router, blocked_paths, len(x))
        assert not (blocked_paths[:, lvl] == node).any(), \
            f"blocked=({lvl}, {node}) (0-based level) but rows were still routed to that node"
        moved = paths[:, lvl] == node
        assert moved.any() and not (blocked_paths[moved, lvl] == node).any()
    parent = int(paths[0, 0])
    for bad in ([(0, j) for j in range(k)], [(router.levels, 0)], [(0, k)], [(1, parent * k + j) for j in range(k)]):
        try:
            router.route(x, blocked=bad)
        except ValueError:
            continue
        raise AssertionError(f"route(blocked={bad}) must raise ValueError (every child of a node blocked, or a node "
                             "outside the tree)")


class RouterTests:
    """pytest mix-in: subclass as `class TestMine(RouterTests)` and set `plugin` (and `options`)."""

    plugin: Any = None                        # registry name of the router, or its class
    options: Mapping[str, Any] | None = None  # as under `index.router.options` in a recipe

    def make(self, seed: int = 0) -> Router:
        from ..config import RouterConfig
        from .common import make_plugin

        assert self.plugin is not None, "set `plugin` to the router's registry name or class"
        cfg = RouterConfig(name=self.plugin if isinstance(self.plugin, str) else "?", branching=K, levels=LEVELS,
                           iters=5, batch_size=256, options=dict(self.options or {}))
        return make_plugin("routers", self.plugin, "from_config", cfg, seed=seed, options=self.options)

    def test_shape_from_config(self):
        router = self.make()
        assert (router.branching, router.levels) == (K, LEVELS), "from_config must take branching/levels from cfg"

    def test_valid_paths(self):
        x = clustered_embeddings()
        router = self.make().fit(x)
        check_paths(router, router.route(x), len(x))

    def test_deterministic(self):
        x = clustered_embeddings(seed=1)
        np.testing.assert_array_equal(self.make(0).fit(x).route(x), self.make(0).fit(x).route(x))

    def test_save_load_round_trip(self, tmp_path):
        x = clustered_embeddings(seed=2)
        router = self.make().fit(x)
        router.save(tmp_path / "tree.safetensors")
        np.testing.assert_array_equal(type(router).load(tmp_path / "tree.safetensors").route(x), router.route(x))

    def test_blocked_honoured(self):
        x = clustered_embeddings(seed=3)
        router = self.make().fit(x)
        check_blocked(router, x, router.route(x))

    def test_all_checks(self):
        check_router(self.make)

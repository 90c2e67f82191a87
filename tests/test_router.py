"""Hierarchical k-means router: routing rule, balancing, determinism, blocking, persistence."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hmlm.config import RouterConfig
from hmlm.routers.hkmeans import HierarchicalKMeans, balance_bound, fit_node, normalize, rebalance


def clustered(n_top: int = 4, n_sub: int = 4, per: int = 25, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Points in n_top well-separated groups, each made of n_sub tighter sub-groups."""
    rng = np.random.default_rng(seed)
    top = 4.0 * rng.standard_normal((n_top, dim))
    sub = top[:, None, :] + 1.0 * rng.standard_normal((n_top, n_sub, dim))
    pts = sub[:, :, None, :] + 0.05 * rng.standard_normal((n_top, n_sub, per, dim))
    return rng.permutation(pts.reshape(-1, dim)).astype(np.float32)


def brute_force_check(tree: HierarchicalKMeans, x: np.ndarray, paths: np.ndarray) -> None:
    """Each level's id is a child of the previous one and the nearest (L2) of those k children."""
    k, xn = tree.branching, normalize(x)
    parent = np.zeros(len(x), dtype=np.int64)
    for lv in range(tree.levels):
        assert np.array_equal(paths[:, lv] // k, parent)
        kids = parent[:, None] * k + np.arange(k)[None, :]                       # [N, k]
        d = ((xn[:, None, :] - tree.centroids[lv][kids]) ** 2).sum(-1)           # [N, k]
        chosen = ((xn - tree.centroids[lv][paths[:, lv]]) ** 2).sum(-1)
        assert np.all(chosen <= d.min(1) + 1e-5)
        parent = paths[:, lv]


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered()


@pytest.fixture(scope="module")
def tree(data: np.ndarray) -> HierarchicalKMeans:
    return HierarchicalKMeans(4, 3, iters=10, batch_size=64, seed=1).fit(data)


def test_shapes_ids_and_descent(tree: HierarchicalKMeans, data: np.ndarray) -> None:
    assert [c.shape for c in tree.centroids] == [(4, 32), (16, 32), (64, 32)]
    assert all(c.dtype == np.float32 and np.isfinite(c).all() for c in tree.centroids)
    paths = tree.route(data)
    assert paths.shape == (len(data), 3) and paths.dtype == np.int64
    for lv in range(3):
        assert paths[:, lv].min() >= 0 and paths[:, lv].max() < 4 ** (lv + 1)
    brute_force_check(tree, data, paths)
    queries = np.random.default_rng(5).standard_normal((50, 32)).astype(np.float32)
    brute_force_check(tree, queries, tree.route(queries))


def test_recovers_hierarchy_and_centroids_route_home(data: np.ndarray) -> None:
    tree = HierarchicalKMeans(4, 2, iters=10, seed=0).fit(data)
    paths = tree.route(data)
    # 4 groups of 4 sub-groups of 25: each group is one level-0 node, each sub-group one level-1 node
    assert sorted(np.bincount(paths[:, 0]).tolist()) == [100] * 4
    assert sorted(np.bincount(paths[:, 1], minlength=16).tolist()) == [25] * 16
    for lv in range(2):
        ids = tree.route(tree.centroids[lv])[:, lv]
        assert np.array_equal(ids, np.arange(4 ** (lv + 1)))


def test_determinism(data: np.ndarray) -> None:
    fit = lambda s: HierarchicalKMeans(4, 3, iters=5, batch_size=50, seed=s).fit(data)  # noqa: E731
    a, b, c = fit(3), fit(3), fit(4)
    assert all(np.array_equal(x, y) for x, y in zip(a.centroids, b.centroids))
    assert np.array_equal(a.route(data), b.route(data))
    assert a.fit_stats == b.fit_stats
    assert not all(np.array_equal(x, y) for x, y in zip(a.centroids, c.centroids))


def test_fit_stats(tree: HierarchicalKMeans, data: np.ndarray) -> None:
    s = tree.fit_stats
    assert s["n_docs"] == len(data) and len(s["levels"]) == 3
    assert s["fit_max_over_bound"] <= 1.0  # the balance bound holds on every node's fitted assignment
    assert 0.0 < s["route_max_share"] <= 1.0
    paths = tree.route(data)
    # the reported routed shares are those of route() itself
    share0 = np.bincount(paths[:, 0], minlength=4).max() / len(data)
    assert s["levels"][0]["route_max_share"] == pytest.approx(share0)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(n=st.integers(0, 200), k=st.integers(2, 8), balance=st.floats(1.0, 3.0),
       skew=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_rebalance_bound(n: int, k: int, balance: float, skew: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # skewed start: a `skew` fraction of points in cluster 0, the rest anywhere
    assign = np.where(rng.random(n) < skew, 0, rng.integers(k, size=n))
    out = rebalance(assign, k, balance_bound(n, k, balance), rng)
    counts = np.bincount(out, minlength=k)
    assert counts.sum() == n and counts.max() <= max(1, int(np.ceil(balance * n / k)))
    if n >= k:
        assert counts.min() >= 1


@settings(max_examples=80, deadline=None, derandomize=True)
@given(n=st.integers(0, 120), dim=st.integers(1, 6), k=st.integers(2, 6), balance=st.floats(1.0, 2.5),
       batch=st.integers(1, 80), seed=st.integers(0, 2**16), dup=st.booleans())
def test_fit_node_balance_bound(n: int, dim: int, k: int, balance: float, batch: int, seed: int,
                                dup: bool) -> None:
    rng = np.random.default_rng(seed)
    x = normalize(rng.standard_normal((n, dim)))
    if dup and n:  # many identical points: k-means++ and balancing must still cope
        x[: n // 2] = x[0]
    cent, assign = fit_node(x, np.zeros(dim, np.float32), k=k, iters=3, batch_size=batch, balance=balance, rng=rng)
    assert cent.shape == (k, dim) and np.isfinite(cent).all() and assign.shape == (n,)
    if n:
        assert np.bincount(assign, minlength=k).max() <= balance_bound(n, k, balance)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=st.integers(1, 60), dim=st.integers(2, 8), k=st.integers(2, 4), levels=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_descent_is_nearest_child_random(n: int, dim: int, k: int, levels: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    tree = HierarchicalKMeans(k, levels, iters=3, batch_size=16, seed=seed).fit(x)
    q = np.concatenate([x, rng.standard_normal((20, dim)).astype(np.float32)])
    brute_force_check(tree, q, tree.route(q))
    assert tree.fit_stats["fit_max_over_bound"] <= 1.0


def test_tiny_and_empty_nodes() -> None:
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    tree = HierarchicalKMeans(4, 3, seed=0).fit(x)
    assert [c.shape[0] for c in tree.centroids] == [4, 16, 64]
    assert all(np.isfinite(c).all() for c in tree.centroids)
    # every level has k distinct children under every node, so any vector descends
    for c in tree.centroids:
        assert len(np.unique(c.round(7), axis=0)) == len(c)
    paths = tree.route(x)
    assert len(set(paths[:, -1].tolist())) == 3  # the three documents end in different leaves
    q = np.random.default_rng(1).standard_normal((30, 8)).astype(np.float32)
    brute_force_check(tree, q, tree.route(q))
    assert tree.route(np.zeros((2, 8), np.float32)).shape == (2, 3)  # a zero vector routes too


def test_blocked(tree: HierarchicalKMeans, data: np.ndarray) -> None:
    base = tree.route(data)
    gone = int(np.bincount(base[:, 0]).argmax())
    moved = tree.route(data, blocked=[(0, gone)])
    assert not (moved[:, 0] == gone).any()
    keep = base[:, 0] != gone
    assert np.array_equal(moved[keep], base[keep])  # documents elsewhere are untouched
    # the fallback is the nearest unblocked sibling
    xn = normalize(data[~keep])
    d = ((xn[:, None, :] - tree.centroids[0][None, :, :]) ** 2).sum(-1)
    d[:, gone] = np.inf
    assert np.array_equal(moved[~keep, 0], d.argmin(1))
    # blocking a deeper node only reroutes within its parent
    leaf = int(base[0, 2])
    moved2 = tree.route(data, blocked=[(2, leaf)])
    assert not (moved2[:, 2] == leaf).any() and np.array_equal(moved2[:, :2], base[:, :2])
    p = int(base[0, 0])
    with pytest.raises(ValueError, match=f"all 4 children of node {p} of level 0"):
        tree.route(data, blocked=[(1, 4 * p + j) for j in range(4)])
    with pytest.raises(ValueError, match="all 4 children of the root"):
        tree.route(data, blocked=[(0, j) for j in range(4)])
    with pytest.raises(ValueError, match="outside the tree"):
        tree.route(data, blocked=[(3, 0)])
    with pytest.raises(ValueError, match="outside the tree"):
        tree.route(data, blocked=[(0, 4)])


def test_save_load_roundtrip(tree: HierarchicalKMeans, data: np.ndarray, tmp_path) -> None:
    tree.save(tmp_path / "index")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["tree.safetensors"]  # no temp left
    back = HierarchicalKMeans.load(tmp_path / "index")
    assert (back.branching, back.levels, back.dim, back.seed) == (4, 3, 32, 1)
    assert back.fit_stats == tree.fit_stats
    assert all(np.array_equal(a, b) for a, b in zip(tree.centroids, back.centroids))
    assert np.array_equal(back.route(data), tree.route(data))
    with pytest.raises(FileNotFoundError, match="tree.safetensors"):
        HierarchicalKMeans.load(tmp_path / "nowhere")


def test_from_config_and_errors(data: np.ndarray) -> None:
    tree = HierarchicalKMeans.from_config(RouterConfig(name="x", branching=3, levels=2, iters=2), seed=7)
    assert (tree.branching, tree.levels, tree.iters, tree.seed, tree.balance) == (3, 2, 2, 7, 1.5)
    with pytest.raises(RuntimeError, match="not fitted"):
        tree.route(data)
    tree.fit(data, progress=True)  # the rich progress bar must not get in the way
    with pytest.raises(ValueError, match="dim 5"):
        tree.route(np.ones((2, 5), np.float32))
    bad = data[:3].copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="row 1"):
        tree.route(bad)
    with pytest.raises(ValueError, match="0 embeddings"):
        HierarchicalKMeans(2, 1).fit(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="balance"):
        HierarchicalKMeans(2, 1, balance=0.5)
    assert tree.route(np.zeros((0, 32), np.float32)).shape == (0, 2)

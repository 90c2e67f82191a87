"""Hierarchical (divisive) k-means router: the paper's retriever (paper-notes §2).

Fit, top-down: at each node, mini-batch k-means (k-means++ init) on the documents that route into
that node, then a balancing pass (Jégou et al.) so that no child holds more than balance/k of them;
the children's centroids are the means of the balanced clusters.

Route: greedy nearest-centroid (L2) descent from the root. It is the one function used both for the
documents of the index and for inference-time text, so the document paths used in training must be
`route(embeddings)` on the fitted tree -- not the (balanced) assignment seen during fitting.

Node ids: level l (0-based) has k**(l+1) nodes; the children of node p at level l are p*k + j at
level l+1, and `centroids[l]` is a float32 array [k**(l+1), dim].
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..utils import atomic_write_path
from .blocking import blocked_masks

FORMAT = "hmlm.hkmeans/1"
TREE_FILE = "tree.safetensors"
_NOISE = 1e-4  # jitter that tells apart children copied from one parent centroid (empty/tiny nodes)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def balance_bound(n: int, k: int, balance: float) -> int:
    """Most documents one child may hold in a node of n documents: balance/k of them, rounded up."""
    return max(1, math.ceil(balance * n / k))


def _sq_dist(x: np.ndarray, c: np.ndarray, c_sq: np.ndarray) -> np.ndarray:
    # ||x - c||^2 up to ||x||^2, which is the same for every centroid and so cannot change an argmin
    return c_sq[None, :] - 2.0 * (x @ c.T)


def _nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return _sq_dist(x, c, (c * c).sum(1)).argmin(1)


def rebalance(assign: np.ndarray, k: int, bound: int, rng: np.random.Generator) -> np.ndarray:
    """Split oversized (> bound) and fill empty clusters, Jégou et al. style; returns a new array.

    While the largest cluster holds more than `bound`, or some cluster is empty although there are at
    least k points, the members of the largest and the smallest cluster are pooled and dealt out
    evenly at random between the two. Every split lowers the sum of squared cluster sizes (the
    largest exceeds the smallest by at least 2 whenever a split happens), so the loop ends.
    """
    assign = np.array(assign, dtype=np.int64, copy=True)
    counts = np.bincount(assign, minlength=k)
    fill_empty = len(assign) >= k
    while True:
        big, small = int(counts.argmax()), int(counts.argmin())
        if counts[big] <= bound and not (fill_empty and counts[small] == 0):
            return assign
        pool = rng.permutation(np.flatnonzero((assign == big) | (assign == small)))
        half = (len(pool) + 1) // 2
        assign[pool[:half]] = big
        assign[pool[half:]] = small
        counts[big], counts[small] = half, len(pool) - half


def _means(x: np.ndarray, assign: np.ndarray, k: int, fallback: np.ndarray) -> np.ndarray:
    """Per-cluster mean of x (a one-hot matmul, much faster than np.add.at); empty clusters keep fallback."""
    onehot = np.zeros((k, len(x)), dtype=np.float32)
    onehot[assign, np.arange(len(x))] = 1.0
    counts = onehot.sum(1)
    sums = onehot @ x
    out = fallback.copy()
    filled = counts > 0
    out[filled] = sums[filled] / counts[filled, None]
    return out


def kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (as in scikit-learn): each next centre is the best, by remaining
    potential, of 2 + log(k) points drawn with probability ~ squared distance to the nearest centre.
    The few extra candidates make the classic failure (two true clusters under one centre) rarer."""
    m, trials = len(x), 2 + int(math.log(k))
    x_sq = (x * x).sum(1, dtype=np.float64)
    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    i = int(rng.integers(m))
    centers[0] = x[i]
    d2 = np.maximum(x_sq - 2.0 * (x @ x[i]) + x_sq[i], 0.0)
    for j in range(1, k):
        cum = np.cumsum(d2)
        if cum[-1] <= 0.0:  # every point coincides with a centre already: any point will do
            cand = rng.integers(m, size=trials)
        else:
            cand = np.minimum(np.searchsorted(cum, rng.random(trials) * cum[-1], side="right"), m - 1)
        dc = np.maximum(x_sq[:, None] - 2.0 * (x @ x[cand].T) + x_sq[cand][None, :], 0.0)  # [m, trials]
        dc = np.minimum(d2[:, None], dc)
        best = int(dc.sum(0).argmin())
        centers[j] = x[cand[best]]
        d2 = dc[:, best]
    return centers


def fit_node(x: np.ndarray, anchor: np.ndarray, *, k: int, iters: int, batch_size: int, balance: float,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """k child centroids for a node holding the rows of x, and each row's balanced child (fitting).

    `anchor` is the node's own centroid, used for children that get no documents. The returned
    assignment holds the balance bound; the centroids are its cluster means.
    """
    n, d = x.shape
    if n == 0:  # an empty node still needs k distinct children so that any vector can descend
        return (anchor[None, :] + _NOISE * rng.standard_normal((k, d))).astype(np.float32), np.empty(0, np.int64)
    if n <= k:  # one document per child; the remaining children are jittered copies of the node
        cent = (anchor[None, :] + _NOISE * rng.standard_normal((k, d))).astype(np.float32)
        cent[:n] = x
        return cent, np.arange(n, dtype=np.int64)
    m = min(n, batch_size)
    full = m == n  # with few documents every EM step uses all of them (plain Lloyd iterations)
    cent = kmeans_pp(x if full else x[rng.choice(n, m, replace=False)], k, rng)
    bound_m = balance_bound(m, k, balance)
    for _ in range(iters):
        batch = x if full else x[rng.choice(n, m, replace=False)]
        # balancing inside EM too, so the centroids drift towards balanced clusters before the final pass
        assign = rebalance(_nearest(batch, cent), k, bound_m, rng)
        cent = _means(batch, assign, k, fallback=cent)
    assign = rebalance(_nearest(x, cent), k, balance_bound(n, k, balance), rng)
    return _means(x, assign, k, fallback=cent), assign


class HierarchicalKMeans:
    """Top-down balanced k-means tree over L2-normalised embeddings (the `hkmeans` router)."""

    name = "hkmeans"

    def __init__(self, branching: int = 16, levels: int = 4, *, iters: int = 20, batch_size: int = 6400,
                 balance: float = 1.5, seed: int = 0):
        if branching < 2:
            raise ValueError(f"hkmeans: branching (k) must be >= 2, got {branching}")
        if levels < 1:
            raise ValueError(f"hkmeans: levels must be >= 1, got {levels}")
        if iters < 0 or batch_size < 1:
            raise ValueError(f"hkmeans: need iters >= 0 and batch_size >= 1, got {iters} and {batch_size}")
        if not balance >= 1.0:
            raise ValueError(f"hkmeans: balance must be >= 1 (a multiple of the fair share 1/k), got {balance}")
        self.branching, self.levels = int(branching), int(levels)
        self.iters, self.batch_size, self.balance, self.seed = int(iters), int(batch_size), float(balance), int(seed)
        self.dim: int | None = None
        self.centroids: list[np.ndarray] = []
        self.fit_stats: dict[str, Any] = {}
        self._c_sq: list[np.ndarray] = []

    @classmethod
    def from_config(cls, cfg: Any, *, seed: int) -> "HierarchicalKMeans":
        return cls(cfg.branching, cfg.levels, iters=cfg.iters, batch_size=cfg.batch_size,
                   balance=cfg.balance, seed=seed)

    # ---- fitting -------------------------------------------------------------------------------

    def fit(self, embeddings: np.ndarray, *, progress: bool = False) -> "HierarchicalKMeans":
        x = normalize(self._check(embeddings, need_fit=False))
        if len(x) == 0:
            raise ValueError("hkmeans.fit: got 0 embeddings; need at least one document to build a tree")
        n, d = x.shape
        k = self.branching
        self.dim, self.centroids, self._c_sq = d, [], []
        root = x.mean(0)
        parent = np.zeros(n, dtype=np.int64)  # node of each document at the level above (the root: 0)
        level_stats = []
        with _progress_bar(progress, sum(k**lv for lv in range(self.levels)), "hkmeans fit") as advance:
            for lv in range(self.levels):
                n_parents = k**lv
                cent = np.empty((n_parents * k, d), dtype=np.float32)
                fitted = np.empty(n, dtype=np.int64)
                order, starts = _group(parent, n_parents)
                for p in range(n_parents):
                    rows = order[starts[p]:starts[p + 1]]
                    anchor = root if lv == 0 else self.centroids[lv - 1][p]
                    rng = np.random.default_rng([self.seed, lv, p])
                    cent[p * k:(p + 1) * k], assign = fit_node(
                        x[rows], anchor, k=k, iters=self.iters, batch_size=self.batch_size,
                        balance=self.balance, rng=rng)
                    fitted[rows] = p * k + assign
                    advance()
                self.centroids.append(cent)
                self._c_sq.append((cent * cent).sum(1))
                # the next level is fitted on the documents that *route* into each node, so that deeper
                # clusters are built from the documents that will actually be stored under them
                routed = self._descend(x, parent, lv, None)
                level_stats.append(self._level_stats(parent, fitted, routed, n_parents))
                parent = routed
        self.fit_stats = {
            "n_docs": n,
            "bound_share": self.balance / k,
            "fit_max_over_bound": max(s["fit_max_over_bound"] for s in level_stats),
            "route_max_share": max((s["route_max_share"] for s in level_stats
                                    if s["route_max_share"] is not None), default=None),
            "levels": level_stats,
        }
        return self

    def _level_stats(self, parent: np.ndarray, fitted: np.ndarray, routed: np.ndarray,
                     n_parents: int) -> dict[str, Any]:
        """Child shares of one level under the fitted (balanced) and the routed assignment."""
        k = self.branching
        n_p = np.bincount(parent, minlength=n_parents)
        bound = np.maximum(1, np.ceil(self.balance * n_p / k))
        fit_c = np.bincount(fitted, minlength=n_parents * k).reshape(n_parents, k).max(1)
        route_c = np.bincount(routed, minlength=n_parents * k).reshape(n_parents, k)
        has, big = n_p > 0, n_p >= k  # shares of nodes with fewer than k documents say nothing
        return {
            "nodes": n_parents * k,
            "empty_nodes": int((route_c == 0).sum()),
            "fit_max_over_bound": float((fit_c[has] / bound[has]).max()),
            "fit_max_share": float((fit_c[big] / n_p[big]).max()) if big.any() else None,
            "route_max_over_bound": float((route_c.max(1)[has] / bound[has]).max()),
            "route_max_share": float((route_c.max(1)[big] / n_p[big]).max()) if big.any() else None,
            "route_agreement": float((fitted == routed).mean()),
        }

    # ---- routing -------------------------------------------------------------------------------

    def route(self, embeddings: np.ndarray, *, blocked: Sequence[tuple[int, int]] = ()) -> np.ndarray:
        """[N, levels] int64 node ids: greedy nearest-centroid descent; blocked nodes are skipped."""
        x = normalize(self._check(embeddings, need_fit=True))
        masks = self._blocked_masks(blocked)
        paths = np.empty((len(x), self.levels), dtype=np.int64)
        parent = np.zeros(len(x), dtype=np.int64)
        for lv in range(self.levels):
            parent = paths[:, lv] = self._descend(x, parent, lv, masks.get(lv))
        return paths

    def _descend(self, x: np.ndarray, parent: np.ndarray, lv: int, mask: np.ndarray | None) -> np.ndarray:
        """Child at level `lv` of each row, among the k children of its node `parent` (level lv-1)."""
        k = self.branching
        cent, c_sq = self.centroids[lv], self._c_sq[lv]
        out = np.empty(len(x), dtype=np.int64)
        if len(x) == 0:
            return out
        # rows grouped by node: one small matmul per visited node instead of gathering [N, k, dim]
        order = np.argsort(parent, kind="stable")
        nodes, starts = np.unique(parent[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        for p, s, e in zip(nodes.tolist(), starts.tolist(), ends.tolist()):
            rows = order[s:e]
            sl = slice(p * k, (p + 1) * k)
            dist = _sq_dist(x[rows], cent[sl], c_sq[sl])
            if mask is not None and mask[sl].any():
                if mask[sl].all():
                    where = "the root" if lv == 0 else f"node {p} of level {lv - 1}"
                    raise ValueError(f"hkmeans.route: all {k} children of {where} are blocked; "
                                     f"unblock at least one of level-{lv} nodes {p * k}..{(p + 1) * k - 1}")
                dist[:, mask[sl]] = np.inf
            out[rows] = p * k + dist.argmin(1)
        return out

    def _blocked_masks(self, blocked: Sequence[tuple[int, int]]) -> dict[int, np.ndarray]:
        return blocked_masks(blocked, self.branching, self.levels, "hkmeans.route")

    def _check(self, embeddings: np.ndarray, *, need_fit: bool) -> np.ndarray:
        x = np.asarray(embeddings)
        if x.ndim != 2 or x.shape[1] == 0:
            raise ValueError(f"hkmeans: embeddings must be a 2-D array [N, dim] with dim >= 1, got shape {x.shape}")
        if need_fit:
            if not self.centroids:
                raise RuntimeError("hkmeans: the tree is not fitted; call fit(embeddings) or "
                                   "HierarchicalKMeans.load(index_dir) first")
            if x.shape[1] != self.dim:
                raise ValueError(f"hkmeans: embeddings have dim {x.shape[1]} but the tree was fitted on "
                                 f"dim {self.dim} (was the index built with another embedder?)")
        if not np.isfinite(x).all():
            bad = int(np.flatnonzero(~np.isfinite(x).all(1))[0])
            raise ValueError(f"hkmeans: embedding row {bad} contains NaN or inf")
        return x

    # ---- persistence ---------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write `<path>/tree.safetensors` (or `path` itself if it ends in .safetensors) atomically."""
        from safetensors.numpy import save_file

        if not self.centroids:
            raise RuntimeError("hkmeans.save: nothing to save; fit the tree first")
        file = _tree_file(Path(path))
        file.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"level{lv}": np.ascontiguousarray(c) for lv, c in enumerate(self.centroids)}
        meta = {"format": FORMAT, "k": str(self.branching), "levels": str(self.levels), "dim": str(self.dim),
                "seed": str(self.seed), "iters": str(self.iters), "batch_size": str(self.batch_size),
                "balance": repr(self.balance), "fit_stats": json.dumps(self.fit_stats)}
        with atomic_write_path(file) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> "HierarchicalKMeans":
        from safetensors import safe_open

        file = _tree_file(Path(path))
        if not file.is_file():
            raise FileNotFoundError(f"hkmeans.load: {file} not found (run `hmlm index` to build the tree)")
        with safe_open(str(file), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{file}: metadata `format` is {meta.get('format')!r}, expected {FORMAT!r}")
            try:
                tree = cls(int(meta["k"]), int(meta["levels"]), iters=int(meta["iters"]),
                           batch_size=int(meta["batch_size"]), balance=float(meta["balance"]),
                           seed=int(meta["seed"]))
                dim, stats = int(meta["dim"]), json.loads(meta["fit_stats"])
            except KeyError as exc:
                raise ValueError(f"{file}: metadata key {exc} is missing") from None
            except ValueError as exc:
                raise ValueError(f"{file}: bad metadata value: {exc}") from None
            for lv in range(tree.levels):
                key = f"level{lv}"
                if key not in f.keys():
                    raise ValueError(f"{file}: tensor `{key}` is missing")
                c = f.get_tensor(key).astype(np.float32, copy=False)
                want = (tree.branching ** (lv + 1), dim)
                if c.shape != want:
                    raise ValueError(f"{file}: tensor `{key}` has shape {c.shape}, expected {want}")
                tree.centroids.append(c)
                tree._c_sq.append((c * c).sum(1))
        tree.dim, tree.fit_stats = dim, stats
        return tree


def _tree_file(path: Path) -> Path:
    return path if path.suffix == ".safetensors" else path / TREE_FILE


def _group(ids: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by id and the start offset of every id (n_groups + 1 offsets)."""
    order = np.argsort(ids, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(ids, minlength=n_groups))])
    return order, starts


@contextmanager
def _progress_bar(enabled: bool, total: int, label: str) -> Iterator[Callable[[], None]]:
    """A rich progress bar (or nothing); yields a zero-argument `advance`."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)

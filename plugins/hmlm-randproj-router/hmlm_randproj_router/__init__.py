"""A random-projection tree router for hmlm: the control for "how much does the router matter?".

Every node of the tree splits its documents among its k children with k random directions: a document goes to the
child whose direction has the largest dot product with (x - the node's centre). Nothing is learned but the centres
(the mean of the fitting documents that reach a node, with `center: true`) and, with `candidates > 1`, which of
several random draws splits the node's fitting documents most evenly. Nearby documents still tend to share a path
(a random hyperplane tree is locality-sensitive), but the clusters are not semantic, unlike hkmeans's.

Node numbering follows hmlm.protocols.Router: level l (0-based) has k**(l+1) nodes and the children of node p are
p*k + j, so the child directions of level l are stored as one [k**(l+1), dim] matrix, like hkmeans's centroids.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hmlm.protocols import PLUGIN_API
from hmlm.routers.blocking import blocked_masks
from hmlm.utils import atomic_write_path

__version__ = "0.1.0"
FORMAT = "hmlm-randproj-1"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class RandomProjectionRouter:
    hmlm_plugin_api = PLUGIN_API
    name = "randproj"

    @dataclass
    class Options:
        candidates: int = 1   # random direction sets drawn per node; the most even split of the fitting docs is kept
        center: bool = True   # project x minus the node's centre (mean of its fitting documents) instead of x

        def __post_init__(self) -> None:
            if self.candidates < 1:
                raise ValueError(f"candidates must be >= 1, got {self.candidates}")

    def __init__(self, branching: int = 16, levels: int = 4, *, seed: int = 0,
                 options: "RandomProjectionRouter.Options | None" = None):
        if branching < 2 or levels < 1:
            raise ValueError(f"randproj: need branching >= 2 and levels >= 1, got {branching} and {levels}")
        self.branching, self.levels, self.seed = int(branching), int(levels), int(seed)
        self.options = options or self.Options()
        self.dim: int | None = None
        self.directions: list[np.ndarray] = []   # level l: [k**(l+1), dim], row p*k + j = child j of node p
        self.centres: list[np.ndarray] = []      # level l: [k**l, dim], the centre of each parent node
        self.fit_stats: dict[str, Any] = {}

    @classmethod
    def from_config(cls, cfg: Any, *, seed: int, options: "RandomProjectionRouter.Options | None" = None):
        return cls(cfg.branching, cfg.levels, seed=seed, options=options)

    def fit(self, embeddings: np.ndarray, *, progress: bool = False) -> "RandomProjectionRouter":
        x = self._check(embeddings, fitted=False)
        if len(x) == 0:
            raise ValueError("randproj.fit: got 0 embeddings; need at least one document")
        n, d = x.shape
        k = self.branching
        self.dim, self.directions, self.centres = d, [], []
        parent = np.zeros(n, dtype=np.int64)
        stats = []
        for lv in range(self.levels):
            n_parents = k ** lv
            dirs = np.empty((n_parents * k, d), dtype=np.float32)
            centres = np.zeros((n_parents, d), dtype=np.float32)
            child = np.empty(n, dtype=np.int64)
            for p in range(n_parents):
                rows = np.flatnonzero(parent == p)
                if self.options.center and len(rows):
                    centres[p] = x[rows].mean(0)
                elif self.options.center and lv > 0:  # an empty node inherits its parent's centre
                    centres[p] = self.centres[lv - 1][p // k]
                rng = np.random.default_rng([self.seed, lv, p])
                best, best_max = None, None
                for _ in range(self.options.candidates):
                    cand = _unit(rng.standard_normal((k, d))).astype(np.float32)
                    assign = ((x[rows] - centres[p]) @ cand.T).argmax(1) if len(rows) else np.zeros(0, np.int64)
                    worst = int(np.bincount(assign, minlength=k).max()) if len(rows) else 0
                    if best is None or worst < best_max:
                        best, best_max, best_assign = cand, worst, assign
                dirs[p * k:(p + 1) * k] = best
                child[rows] = p * k + best_assign
            self.directions.append(dirs)
            self.centres.append(centres)
            counts = np.bincount(child, minlength=n_parents * k)
            stats.append({"nodes": n_parents * k, "empty_nodes": int((counts == 0).sum()),
                          "max_share": float(counts.max() / n)})
            parent = child
        self.fit_stats = {"n_docs": n, "candidates": self.options.candidates, "levels": stats}
        return self

    def route(self, embeddings: np.ndarray, *, blocked: Sequence[tuple[int, int]] = ()) -> np.ndarray:
        x = self._check(embeddings, fitted=True)
        k = self.branching
        masks = blocked_masks(blocked, self.branching, self.levels, "randproj.route")  # hmlm's shared parser
        paths = np.empty((len(x), self.levels), dtype=np.int64)
        parent = np.zeros(len(x), dtype=np.int64)
        for lv in range(self.levels):
            # each row's k child directions, gathered: [N, k, dim]
            dirs = self.directions[lv].reshape(-1, k, self.dim)[parent]
            scores = np.einsum("nd,nkd->nk", x - self.centres[lv][parent], dirs)
            if lv in masks:
                blocked_children = masks[lv].reshape(-1, k)[parent]
                if blocked_children.all(1).any():
                    p = int(parent[blocked_children.all(1)][0])
                    raise ValueError(f"randproj.route: all {k} children of node {p} (level {lv - 1}) are blocked")
                scores = np.where(blocked_children, -np.inf, scores)
            parent = paths[:, lv] = parent * k + scores.argmax(1)
        return paths

    def _check(self, embeddings: np.ndarray, *, fitted: bool) -> np.ndarray:
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] == 0:
            raise ValueError(f"randproj: embeddings must be [N, dim], got shape {x.shape}")
        if fitted:
            if not self.directions:
                raise RuntimeError("randproj: not fitted; call fit() or RandomProjectionRouter.load() first")
            if x.shape[1] != self.dim:
                raise ValueError(f"randproj: embeddings have dim {x.shape[1]}, the tree was fitted on dim {self.dim}")
        return x

    def save(self, path: Path) -> None:
        """Write `path` (hmlm passes `<index dir>/tree.safetensors`) atomically."""
        from safetensors.numpy import save_file

        path = Path(path)
        tensors = {f"dirs{lv}": np.ascontiguousarray(d) for lv, d in enumerate(self.directions)}
        tensors.update({f"centres{lv}": np.ascontiguousarray(c) for lv, c in enumerate(self.centres)})
        meta = {"format": FORMAT, "k": str(self.branching), "levels": str(self.levels), "seed": str(self.seed),
                "dim": str(self.dim), "candidates": str(self.options.candidates), "center": str(self.options.center),
                "fit_stats": json.dumps(self.fit_stats)}
        with atomic_write_path(path) as tmp:   # hmlm's helper: a temp file beside `path`, renamed onto it
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> "RandomProjectionRouter":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a randproj tree (format {meta.get('format')!r}, expected {FORMAT!r})")
            router = cls(int(meta["k"]), int(meta["levels"]), seed=int(meta["seed"]),
                         options=cls.Options(candidates=int(meta["candidates"]), center=meta["center"] == "True"))
            router.dim, router.fit_stats = int(meta["dim"]), json.loads(meta["fit_stats"])
            router.directions = [f.get_tensor(f"dirs{lv}") for lv in range(router.levels)]
            router.centres = [f.get_tensor(f"centres{lv}") for lv in range(router.levels)]
        return router

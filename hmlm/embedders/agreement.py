"""`hmlm embedder check`: do two embedders route a sample of the corpus to the same tree paths?

The reference is the recipe's embedder with the copy path removed and fp32 arithmetic (the pip package, as the
paper's embedder); each candidate is the copy at `--path` (and, as a control, the reference's own weights) at one
arithmetic precision. Every text of a seeded sample of the recipe's corpus is routed through the recipe's index
tree (built first if missing) by each embedder; agreement at level l is the fraction of texts whose first l path
entries are identical. Cosine similarity of the raw vectors is reported too.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _with(recipe, *, path: str | None, precision: str):
    r = copy.deepcopy(recipe)
    r.index.embedder.path = path
    r.index.embedder.precision = precision
    return r


def path_agreement(ref: np.ndarray, other: np.ndarray) -> list[float]:
    """Fraction of rows whose path prefix of length l+1 agrees, for every level l."""
    same = np.cumprod(ref == other, axis=1).astype(bool)
    return [float(v) for v in same.mean(0)]


def sample_texts(recipe, n_docs: int, seed: int = 0) -> list[str]:
    from ..data.corpus import read_corpus
    from ..index import corpus_path

    docs = read_corpus(corpus_path(recipe), max_docs=recipe.data.max_docs)
    idx = np.sort(np.random.default_rng([seed, 2000]).choice(len(docs), size=min(n_docs, len(docs)),
                                                             replace=False))
    return [docs[i].text for i in idx]


def check_agreement(recipe, copy_path: str | Path, *, n_docs: int = 2000, precisions: Sequence[str] = (
        "float32", "bfloat16"), console=None) -> dict[str, Any]:
    """Route a corpus sample with the reference and each candidate; return per-level agreement and cosines."""
    from ..index import build_embedder, ensure_index, load_router

    index_dir = ensure_index(recipe, console)
    router = load_router(recipe, Path(index_dir) / "tree.safetensors")
    texts = sample_texts(recipe, n_docs, seed=recipe.seed)
    reference = _with(recipe, path=None, precision="float32")
    t0 = time.perf_counter()
    ref_vec = build_embedder(reference).embed(texts, progress=console is not None)
    ref_paths = router.route(ref_vec)
    rows = []
    candidates = [(f"copy at {copy_path}", str(copy_path), p) for p in precisions]
    candidates += [("package (control)", None, p) for p in precisions if p != "float32"]
    for label, path, precision in candidates:
        emb = build_embedder(_with(recipe, path=path, precision=precision))
        vec = emb.embed(texts, progress=console is not None)
        cos = (vec * ref_vec).sum(1)
        ident = emb.identity()
        rows.append({"embedder": label, "weights_dtype": ident.get("weights_dtype"), "precision": precision,
                     "agreement_by_level": path_agreement(ref_paths, router.route(vec)),
                     "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())})
    return {"recipe": recipe.name, "index": str(index_dir), "texts": len(texts),
            "reference": {"weights_dtype": "float32", "precision": "float32", "source": "pip package"},
            "levels": int(ref_paths.shape[1]), "branching": recipe.index.router.branching,
            "max_length": recipe.index.embedder.max_length, "rows": rows,
            "seconds": round(time.perf_counter() - t0, 1)}


def print_agreement(result: dict[str, Any], console) -> None:
    from rich.table import Table

    table = Table(title=f"routing agreement with the fp32 package, {result['texts']} texts of {result['recipe']} "
                        f"(k={result['branching']}, {result['levels']} levels)")
    for col in ("embedder", "weights", "precision", *[f"level {i + 1}" for i in range(result["levels"])],
                "cos mean", "cos min"):
        table.add_column(col, justify="left" if col in ("embedder", "weights", "precision") else "right")
    for r in result["rows"]:
        table.add_row(r["embedder"], str(r["weights_dtype"]), r["precision"],
                      *[f"{100 * a:.2f}%" for a in r["agreement_by_level"]],
                      f"{r['cosine_mean']:.5f}", f"{r['cosine_min']:.5f}")
    console.print(table)

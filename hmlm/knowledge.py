"""Where a model's knowledge sits in its tree, read from what the model directory carries (hmlm.eval.modeldata):
the training documents' word index (`mentions/`), their tree paths (`mentions/paths.safetensors`) and the documents
and tokens routed to each node (`node_stats.safetensors`).

    entity_nodes     the nodes whose training documents mention a name, with counts (`hmlm inspect --entity`)
    removal_nodes    the nodes of one level to block to remove an entity (`--memory blocked:<level>:<node>`, the
                     paper's knowledge-removal test, measured by `hmlm eval --removal`)
    leaf_documents   the training documents routed to a path's leaf that share most words with a text (`hmlm
                     generate --show-path`)
    path_rows        per level of a path: the node and its training documents/tokens

Levels here are 1-based as on the command line (level 1 = the root's children); node ids are the level's global ids.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from .eval.mentions import words
from .eval.modeldata import EvalData


class KnowledgeError(ValueError):
    """The model directory lacks what a knowledge query needs (mention index, training paths)."""


def eval_data_of(model_dir: Path) -> EvalData:
    """The evaluation data of a model directory, without loading its weights."""
    meta = json.loads((Path(model_dir) / "model.json").read_text(encoding="utf-8"))
    return EvalData.of(SimpleNamespace(path=Path(model_dir), meta=meta))


def _mentions_and_paths(data: EvalData):
    mentions = data.mention_index()
    paths = data.training_paths() if mentions is not None else None
    if mentions is None or paths is None:
        raise KnowledgeError(f"{data.label}: {data.mentions_missing}")
    if len(paths) != mentions.n_documents:
        raise KnowledgeError(f"{data.label}: mentions/ holds {mentions.n_documents} training documents but their "
                             f"paths {len(paths)}; re-export the model with `hmlm fit`")
    return mentions, paths


def node_stats(data: EvalData, model_dir: Path) -> dict[str, np.ndarray] | None:
    """{level<L>_docs, level<L>_tokens: per-node counts} from the model directory, else its index; None if neither."""
    from safetensors.numpy import load_file

    for folder in (Path(model_dir), data.heldout, data.index):
        if folder is not None and (Path(folder) / "node_stats.safetensors").is_file():
            return load_file(str(Path(folder) / "node_stats.safetensors"))
    return None


@dataclass
class NodeHits:
    level: int          # 1-based
    node: int           # the level's global id
    documents: int      # training documents in the node that mention the name
    mentions: int       # mentions in those documents
    node_documents: int  # training documents in the node


def entity_nodes(data: EvalData, names: Sequence[str]) -> list[NodeHits]:
    """Per level, every node whose training documents mention one of `names`, most mentioning documents first."""
    mentions, paths = _mentions_and_paths(data)
    per_doc = mentions.mention_documents(names)
    hit = per_doc > 0
    out: list[NodeHits] = []
    for lvl in range(paths.shape[1]):
        nodes = paths[:, lvl]
        docs = np.bincount(nodes[hit], minlength=int(nodes.max()) + 1)
        counts = np.bincount(nodes[hit], weights=per_doc[hit], minlength=len(docs)).astype(np.int64)
        totals = np.bincount(nodes, minlength=len(docs))
        for node in np.flatnonzero(docs):
            out.append(NodeHits(lvl + 1, int(node), int(docs[node]), int(counts[node]), int(totals[node])))
    return sorted(out, key=lambda h: (h.level, -h.documents, -h.mentions, h.node))


DEFAULT_REMOVAL_SHARE = 0.1


def removal_nodes(hits: Sequence[NodeHits], level: int, min_share: float = DEFAULT_REMOVAL_SHARE) -> list[NodeHits]:
    """The nodes of `level` (1-based) to block to remove an entity, from its `entity_nodes`: the node holding the most
    of its training mentions, and every other node of the level holding at least `min_share` of them (mentions in
    the node's training documents / all its training mentions; ties: more mentioning documents, then the lower
    id). Empty when no training document mentions it. Blocking a node masks its subtree, so the deeper levels'
    blocks under it are never fetched either; levels above it are still fetched (their blocks are shared with the
    node's siblings)."""
    if not 0 < min_share <= 1:
        raise ValueError(f"min_share must be in (0, 1], got {min_share}")
    of_level = sorted((h for h in hits if h.level == level), key=lambda h: (-h.mentions, -h.documents, h.node))
    total = sum(h.mentions for h in of_level)
    return [h for i, h in enumerate(of_level) if i == 0 or h.mentions >= min_share * total]


def blocked_memory(nodes: Sequence[NodeHits]) -> str:
    """The `--memory` argument that blocks `nodes` (hmlm.eval.memory_spec): blocked:<level>:<node>[+...]."""
    if not nodes:
        raise ValueError("blocked_memory: no node to block")
    return "blocked:" + "+".join(f"{h.level}:{h.node}" for h in nodes)


def leaf_documents(data: EvalData, path: Sequence[int], text: str, k: int = 3) -> list[dict[str, Any]]:
    """The `k` training documents on exactly this path that share the most distinct words with `text` (ties: the
    earlier document), as {doc, shared, words}: the words as the index holds them (case-folded, no punctuation)."""
    mentions, paths = _mentions_and_paths(data)
    on_leaf = np.flatnonzero((paths == np.asarray(path, dtype=paths.dtype)[None]).all(axis=1))
    query = set(words(text))
    scored = []
    for doc in on_leaf.tolist():
        doc_words = mentions.document_words(doc)
        scored.append((-len(query & set(doc_words)), doc, doc_words))
    scored.sort(key=lambda t: t[:2])
    return [{"doc": doc, "shared": -neg, "words": w} for neg, doc, w in scored[:k]]


def path_rows(stats: dict[str, np.ndarray] | None, path: Sequence[int]) -> list[dict[str, Any]]:
    """Per level of `path`: level (1-based), node, and the node's training documents and tokens when known."""
    rows = []
    for lvl, node in enumerate(path, start=1):
        row: dict[str, Any] = {"level": lvl, "node": int(node)}
        if stats is not None and f"level{lvl}_docs" in stats:
            row["documents"] = int(stats[f"level{lvl}_docs"][node])
            row["tokens"] = int(stats[f"level{lvl}_tokens"][node])
        rows.append(row)
    return rows

"""`hmlm data expand-demo`: a training corpus from a demo folder (hmlm.data.demo): real text plus fact sentences
with exact repeat counts, and lm-eval tasks on held-out templates. Stdlib + numpy only, deterministic for a seed,
so it runs where the corpus is trained (the GPU machine) from the small folder that travelled there.

    hmlm data expand-demo --demo .repro/demo --out runs/demo-corpus [--seed 0] [--facts-per-relation 250]
                          [--text-mb 40]

writes (atomically) to --out:
    corpus.jsonl      real text (minus the held-out documents) and fact documents, shuffled (data.corpus)
    heldout.jsonl     2% of the real-text documents by a hash of their id: the common-knowledge control
    facts_meta.json   every fact with its repeat count and bucket (what `hmlm eval` reads for recorded buckets)
    tasks/            lm-eval tasks (`hmlm eval --include-path DIR/tasks`): demo_<relation> (the paper-style
                      held-out template), demo_<relation>_qa (a question template), demo_heldout_lastword and
                      demo_heldout_ppl on the held-out text
    demo.json         what was expanded: settings, documents and characters per source, facts per bucket

Facts: each relation (atomic_number, symbol, discovery_year, capital, city_country, birth_year) takes up to
`facts_per_relation` facts of its table (a seeded choice where the table has more) and splits them evenly over
the buckets 0 / 1-9 / 10-99 / 100-999 / 1000 (hmlm.data.facts.balanced_counts). A fact with count c is stated
in exactly c sentences, rotating over the relation's training templates, in 1-3-sentence documents about its
entity; the real text states none of them (build-demo removed such sentences). Train for one epoch of the
index and a fact's count is how often the model saw it (minus the ~val_fraction of documents held out for
validation).
"""
from __future__ import annotations

import json
import lzma
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .facts import (BIRTH_YEAR, BUCKETS, FACT_RELATIONS, FactItem, balanced_counts, fact_documents, facts_meta,
                    is_heldout, make_items, relation_rng, table_facts, write_corpus_files)

TEXT_FILE, FACTS_FILE, MANIFEST_FILE = "text.jsonl.xz", "facts.json.xz", "MANIFEST.json"
DEMO_RELATIONS = {**FACT_RELATIONS, BIRTH_YEAR.name: BIRTH_YEAR}
SUBJECT_TABLE = {"element": "elements", "country": "countries", "city": "cities", "person": "people"}
TASK_PREFIX = "demo"
MAX_COUNT = 1000


class DemoError(RuntimeError):
    """A bad --sources / --demo folder for build-demo or expand-demo (printed as one line by the CLI)."""


def fair_shares(sizes: dict[str, int], budget: int) -> dict[str, int]:
    """Max-min fair split of `budget` over sources of `sizes`: a source below the equal share keeps all of it and
    the others divide what it leaves."""
    shares, left, todo = {}, budget, sorted(sizes, key=lambda s: sizes[s])
    while todo:
        equal = left // len(todo)
        s = todo[0]
        if sizes[s] <= equal:
            shares[s] = sizes[s]
            left -= sizes[s]
            todo.pop(0)
            continue
        for s in todo:
            shares[s] = equal
        break
    return shares


def select_text(docs: Sequence[dict], max_chars: int | None, seed: int) -> list[dict]:
    """At most `max_chars` characters of documents, split fairly over their `source`s; a capped source keeps a
    seeded random subset of its documents. Order is preserved. None keeps everything."""
    if max_chars is None:
        return list(docs)
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(docs):
        by_source[d["source"]].append(i)
    sizes = {s: sum(len(docs[i]["text"]) for i in idx) for s, idx in by_source.items()}
    keep: list[int] = []
    for s, share in fair_shares(sizes, max_chars).items():
        idx = by_source[s]
        if share >= sizes[s]:
            keep += idx
            continue
        total = 0
        for j in np.random.default_rng([seed, len(s), *s.encode()]).permutation(len(idx)):
            if total + len(docs[idx[j]]["text"]) > share:
                continue
            keep.append(idx[j])
            total += len(docs[idx[j]]["text"])
    return [docs[i] for i in sorted(keep)]


def read_demo(demo_dir: Path) -> tuple[list[dict], dict, dict]:
    """(text documents, fact tables, manifest) of a folder written by `hmlm data build-demo`."""
    demo_dir = Path(demo_dir)
    missing = [f for f in (TEXT_FILE, FACTS_FILE, MANIFEST_FILE) if not (demo_dir / f).is_file()]
    if missing:
        raise DemoError(f"--demo {demo_dir}: not a demo folder (missing {', '.join(missing)}); build one with "
                        "`hmlm data build-demo --sources DIR --out DIR`")
    try:
        text = lzma.decompress((demo_dir / TEXT_FILE).read_bytes()).decode("utf-8")
        tables = json.loads(lzma.decompress((demo_dir / FACTS_FILE).read_bytes()))
        manifest = json.loads((demo_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (lzma.LZMAError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DemoError(f"--demo {demo_dir}: corrupt file ({exc}); rebuild it with `hmlm data build-demo`") from None
    docs = [json.loads(line) for line in text.splitlines() if line.strip()]
    return docs, tables, manifest


def demo_items(tables: dict, seed: int, facts_per_relation: int | None) -> list[FactItem]:
    """The facts of every demo relation with balanced repeat counts (one random stream per relation)."""
    items: list[FactItem] = []
    for rel in DEMO_RELATIONS.values():
        facts = table_facts(rel, tables[SUBJECT_TABLE[rel.subject]]["rows"])
        rng = relation_rng(seed, rel.name)
        if facts_per_relation is not None and len(facts) > facts_per_relation:
            facts = [facts[i] for i in np.sort(rng.choice(len(facts), size=facts_per_relation, replace=False))]
        items += make_items(rel, facts, balanced_counts(len(facts), rng, max_count=MAX_COUNT))
    return items


def expand_demo(demo_dir: Path, out: Path, *, seed: int = 0, facts_per_relation: int | None = 250,
                text_mb: float | None = None) -> dict[str, Any]:
    """Write the corpus folder described in the module docstring; returns the contents of its demo.json."""
    from ..eval.tasks import fact_rows_of, task_folder_files, write_task_dir
    from ..utils import atomic_dir

    t0 = time.perf_counter()
    text, tables, manifest = read_demo(demo_dir)
    text = select_text(text, None if text_mb is None else int(text_mb * 1e6), seed)
    docs = [d for d in text if not is_heldout(d["id"])]
    heldout = [{**d, "split": "heldout"} for d in text if is_heldout(d["id"])]
    items = demo_items(tables, seed, facts_per_relation)
    docs += list(fact_documents(items, seed))
    schedule = {"kind": "balanced over buckets, log-spread inside", "max_count": MAX_COUNT,
                "facts_per_relation": facts_per_relation}
    meta = facts_meta(items, DEMO_RELATIONS.values(), seed=seed, schedule=schedule, docs=docs,
                      heldout_docs=len(heldout))
    tasks = task_folder_files(fact_rows_of(items, DEMO_RELATIONS), heldout, prefix=TASK_PREFIX,
                              generator="hmlm data expand-demo", corpus="the demo corpus")
    for data, task in (("heldout_lastword", "heldout_lastword"), ("heldout_docs", "heldout_ppl")):
        if not tasks[f"data/{data}.jsonl"]:   # a tiny corpus may hold out no document: no task without items
            del tasks[f"data/{data}.jsonl"], tasks[f"{TASK_PREFIX}_{task}.yaml"]
    summary = {
        "demo": str(demo_dir), "demo_files": manifest.get("files", {}), "seed": seed,
        "facts_per_relation": facts_per_relation, "text_mb": text_mb,
        "sources": meta["stats"]["sources"], "heldout_docs": len(heldout),
        "facts": len(items), "fact_sentences": int(sum(it.repeat_count for it in items)),
        "buckets": {label: sum(1 for it in items if it.bucket == label) for _, _, label in BUCKETS},
        "tasks": sorted(p.removesuffix(".yaml") for p in tasks if p.endswith(".yaml")),
    }
    with atomic_dir(Path(out)) as tmp:
        write_corpus_files(tmp, docs, heldout, meta, seed)
        write_task_dir(tmp / "tasks", files=tasks)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / "demo.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary


def fact_tasks(summary: dict, qa: bool = False) -> list[str]:
    """Names of the demo's fact tasks (paper-style template, or the question template)."""
    return [t for t in summary["tasks"] if t.startswith(f"{TASK_PREFIX}_") and "heldout" not in t
            and t.endswith("_qa") == qa]

"""Which element facts a quickstart model answers from its memory: the table of docs/results.md ("Hafnium from the
quickstart"), for any model trained on the bundled corpus.

For every element and two relations (discovery year, atomic number), the training template's prompt ("<Element> was
discovered in", "<Element> has the atomic number") is decoded greedily for a few tokens with the memory fetched, with
the prompt's own leaf blocked, and with no memory; an answer is right when it starts with the reference. Rows are the
frequency buckets of the training sentences (facts_meta.json's repeat counts).

    HF_HUB_OFFLINE=1 python benchmarks/quickstart_facts.py runs/quickstart/model [--out table.md]
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from hmlm.api import load
from hmlm.data.bundled import load_fact_items
from hmlm.data.facts import BUCKETS

PROMPTS = {"discovery_year": "{name} was discovered in", "atomic_number": "{name} has the atomic number"}
MODES = ("fetched", "blocked leaf", "none")


def answers(model, prompt: str) -> dict[str, str]:
    path = model.route(prompt)
    leaf = f"blocked:{len(path)}:{path[-1]}"
    memories = {"fetched": "fetched", "blocked leaf": leaf, "none": "none"}
    return {mode: model.generate(prompt, memory=memory, max_new_tokens=3) for mode, memory in memories.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    args = ap.parse_args()
    model = load(args.model)
    right: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: {m: [] for m in MODES})
    total: dict[tuple[str, str], int] = defaultdict(int)
    for item in load_fact_items():
        if item.relation not in PROMPTS:
            continue
        key = (item.relation, item.bucket)
        total[key] += 1
        for mode, text in answers(model, PROMPTS[item.relation].format(name=item.entity)).items():
            if text.strip().startswith(item.answer):
                right[key][mode].append(item.entity)
    lines = ["| relation, bucket (training sentences) | facts | " + " | ".join(MODES) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in MODES) + " |"]
    for relation in PROMPTS:
        for _, _, bucket in BUCKETS:
            key = (relation, bucket)
            if total[key]:
                hits = right[key]
                cells = [f"{len(hits[m])}" + (f" ({', '.join(hits[m])})" if m == "fetched" and hits[m] else "")
                         for m in MODES]
                lines.append(f"| {relation.replace('_', ' ')}, {bucket} | {total[key]} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""`hmlm bench memory-types`: train every memory type at equal fetched parameters on one index, then evaluate all.

The recipe's memory sizes define the fetched budget for its memory type; every other type gets per-level sizes scaled
by the ratio of per-unit block sizes (paper-notes §1.3: FFN 3·L·d, LoRA-QK/VO 2·L·(d+h·d_h), LoRA-FFN 3·L·(d+d_f),
KV 2·L·h·d_h), rounded, so the fetched parameter counts match to within rounding. All runs share the index, seed and
schedule; the evaluation (held-out perplexity and long-tail bucket accuracy for fetched/generic/none memory) is the
same `hmlm eval` every model gets.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from .. import registry
from ..bank.layout import BankLayout
from ..config import Recipe
from ..memories.placement import parse_placement
from ..model import build_anchor, build_memory_type

DEFAULT_TYPES = ("ffn", "lora-qk", "lora-vo", "lora-ffn", "kv")


def _layout(recipe: Recipe, mem_type: str, sizes: Sequence[int], vocab_size: int) -> BankLayout:
    anchor = build_anchor(recipe, vocab_size, device="meta")
    layers = parse_placement(recipe.memory.placement, anchor.shape.n_layers)
    return BankLayout(build_memory_type(recipe, mem_type), anchor.shape, tuple(sizes),
                      recipe.index.router.branching, tuple(layers))


def matched_sizes(recipe: Recipe, mem_type: str, vocab_size: int) -> list[int]:
    """Per-level sizes for `mem_type` whose fetched parameters match the recipe's own memory type."""
    ref = _layout(recipe, recipe.memory.type, recipe.memory.sizes, vocab_size)
    unit_ref = ref.block_params(1)
    unit = _layout(recipe, mem_type, [1], vocab_size).block_params(1)
    return [0 if r == 0 else max(1, round(r * unit_ref / unit)) for r in recipe.memory.sizes]


def resolve_types(spec: str) -> list[str]:
    """`--types`: comma-separated memory type names, or `all` for every installed one (plugins included)."""
    if spec.strip() == "all":
        return registry.names("memories")
    return [t for t in spec.split(",") if t]


def run(recipe: Recipe, *, vocab_size: int, types: Sequence[str], out_dir: Path, tasks: Sequence[str],
        limit: int | None, console: Console) -> dict[str, Any]:
    from ..eval.report import EvalOptions, run_eval
    from ..index import ensure_index
    from ..train.fit import fit

    out_dir.mkdir(parents=True, exist_ok=True)
    index = replace(recipe.index, dir=str(out_dir / "index"))
    recipe = replace(recipe, index=index)
    ensure_index(recipe, console)
    rows: list[dict[str, Any]] = []
    for mem_type in types:
        sizes = matched_sizes(recipe, mem_type, vocab_size)
        run_recipe = replace(recipe, name=f"{recipe.name}-{mem_type}", out_dir=str(out_dir / mem_type),
                             memory=replace(recipe.memory, type=mem_type, sizes=sizes,
                                            # the recipe's options belong to its own type; others get their defaults
                                            options=recipe.memory.options if mem_type == recipe.memory.type else {}))
        layout = _layout(run_recipe, mem_type, sizes, vocab_size)
        console.print(f"[bold]bench[/] {mem_type}: sizes {sizes}, fetched {layout.fetched_params():,}, "
                      f"bank {layout.bank_params():,}")
        t0 = time.perf_counter()
        # a re-run of the benchmark replaces its own earlier run of this type (moved aside until the first checkpoint)
        result = fit(run_recipe, overwrite=True, console=console, progress=False)
        rows.append({"type": mem_type, "sizes": sizes, "fetched_params": layout.fetched_params(),
                     "bank_params": layout.bank_params(), "train_seconds": round(time.perf_counter() - t0, 1),
                     "heldout_perplexity": result.get("heldout_perplexity"), "model_dir": result["model_dir"]})
    report = run_eval(EvalOptions(models=[r["model_dir"] for r in rows], tasks=list(tasks), limit=limit,
                                  out=str(out_dir / "eval")), console)
    for row, model in zip(rows, report["models"]):
        row["averages"] = {mode: m["averages"] for mode, m in model["modes"].items()}
    summary = {"recipe": recipe.name, "types": rows, "eval_files": report["files"]}
    (out_dir / "memory_types.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    table = Table(title="memory types at equal fetched parameters")
    for col in ("type", "sizes", "fetched", "ppl fetched", "ppl generic", "ppl none", "SK fetched", "SK none"):
        table.add_column(col, justify="left" if col in ("type", "sizes") else "right")
    for r in rows:
        ppl = r["heldout_perplexity"] or {}
        sk = {m: (a or {}).get("SK") for m, a in r["averages"].items()}
        table.add_row(r["type"], str(r["sizes"]), f"{r['fetched_params']:,}",
                      *(f"{ppl[m]:.2f}" if m in ppl else "-" for m in ("fetched", "generic", "none")),
                      *(f"{100 * sk[m]:.1f}" if sk.get(m) is not None else "-" for m in ("fetched", "none")))
    console.print(table)
    return summary

"""The issue-10 table from one GPU call: the plain-PyTorch reference against `hmlm bench train`, same run.

    python benchmarks/speed_table.py OUT_DIR

Reads what benchmarks/gpu_speed.sh left in OUT_DIR -- ref_b<B>.json (benchmarks/reference_rows.py), hmlm_*.json
(`hmlm bench train --out`), commands.txt, skipped.txt, device.txt -- and writes OUT_DIR/speed.md (markdown for
docs/benchmarks.md) and OUT_DIR/speed.json (the same numbers). Rows missing from the call (a deadline, an out of
memory) appear as such; nothing is estimated.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def _kind(row: dict[str, Any]) -> dict[str, Any]:
    """What a reference or hmlm bench row measured: model, memory, compiled, parameters, and a variant name for rows
    that are not the plain comparison (packed documents, a compile mode other than the default)."""
    if row.get("model") == "reference":
        return {"model": "reference", "memory": bool(row["memory"]), "compiled": bool(row["compiled"]),
                "params": row.get("params"), "variant": None}
    config = row["config"]
    variant = []
    if row.get("doc_mask"):
        variant.append("packed documents")
    if row.get("compile_mode") not in (None, "default"):
        variant.append(f"compile_mode={row['compile_mode']}")
    return {"model": "hmlm", "memory": config.startswith("anchor + memory"), "compiled": config.endswith("compiled"),
            "params": row.get("anchor_params"), "variant": ", ".join(variant) or None}


def load_rows(out: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(out.glob("ref_b*.json")) + sorted(out.glob("hmlm_*.json")):
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"speed_table: {path}: skipped ({exc})", file=sys.stderr)
            continue
        for row in found if isinstance(found, list) else []:
            rows.append({**row, **_kind(row), "source": path.name})
    # an out-of-memory row of the memory store has no anchor_params: it belongs to its file's anchor
    for row in rows:
        if row["params"] is None:
            row["params"] = next((r["params"] for r in rows if r["source"] == row["source"] and r["params"]), None)
    return rows


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "not run"
    if row.get("error"):
        return row["error"].split(":")[0]
    mfu = f" ({100 * row['mfu']:.1f}%)" if row.get("mfu") is not None else ""
    return f"{row['tokens_per_s']:,.0f}{mfu}"


def _mem(row: dict[str, Any] | None) -> str:
    return f"{row['peak_mem_gib']:.1f}" if row and row.get("peak_mem_gib") is not None else "-"


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str = "tokens_per_s") -> float | None:
    if not a or not b or not a.get(key) or not b.get(key):
        return None
    return round(a[key] / b[key], 3)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


NAMES = {("reference", False): "plain PyTorch reference, anchor alone",
         ("hmlm", False): "hmlm anchor alone",
         ("reference", True): "reference + memory given as ready tensors",
         ("hmlm", True): "hmlm + memory (256,64,16,0), device store"}


def _shape_table(rows: list[dict[str, Any]], lines: list[str]) -> dict[str, Any]:
    """The rows of one anchor shape and batch size: reference vs hmlm, eager vs compiled, then the variants."""
    plain = [r for r in rows if r["variant"] is None]

    def pick(model: str, memory: bool, compiled: bool) -> dict[str, Any] | None:
        found = [r for r in plain if (r["model"], r["memory"], r["compiled"]) == (model, memory, compiled)]
        return found[-1] if found else None  # a later file's row of the same kind replaces an earlier one

    cells = {(m, mem, c): pick(m, mem, c) for m in ("reference", "hmlm") for mem in (False, True) for c in (False, True)}
    lines += ["| model | eager tokens/s (MFU) | compiled tokens/s (MFU) | eager peak GiB | compiled peak GiB |",
              "| --- | ---: | ---: | ---: | ---: |"]
    ratios: dict[str, float | None] = {}
    for memory in (False, True):
        for model in ("reference", "hmlm"):
            e, c = cells[(model, memory, False)], cells[(model, memory, True)]
            if e is None and c is None and (model == "reference" or memory):
                continue  # rows this call did not run (the reference's memory rows are part 3)
            lines.append(f"| {NAMES[(model, memory)]} | {_cell(e)} | {_cell(c)} | {_mem(e)} | {_mem(c)} |")
        tag = "memory" if memory else "anchor"
        for mode, compiled in (("eager", False), ("compiled", True)):
            h, r = cells[("hmlm", memory, compiled)], cells[("reference", memory, compiled)]
            ratios[f"hmlm_vs_reference_{tag}_{mode}"] = _ratio(h, r)
            ratios[f"hmlm_vs_reference_{tag}_{mode}_peak_mem"] = _ratio(h, r, "peak_mem_gib")
        if not memory and any(cells[("reference", False, c)] for c in (False, True)):
            lines.append(f"| ratio hmlm / reference | {_fmt(ratios['hmlm_vs_reference_anchor_eager'])} | "
                         f"{_fmt(ratios['hmlm_vs_reference_anchor_compiled'])} | "
                         f"{_fmt(ratios['hmlm_vs_reference_anchor_eager_peak_mem'])} | "
                         f"{_fmt(ratios['hmlm_vs_reference_anchor_compiled_peak_mem'])} |")
    for mode, compiled in (("eager", False), ("compiled", True)):
        # step time with memory / anchor alone = tokens/s of the anchor alone / with memory (target <= 1.10)
        ratios[f"hmlm_memory_step_time_vs_anchor_{mode}"] = _ratio(cells[("hmlm", False, compiled)],
                                                                   cells[("hmlm", True, compiled)])
    if any(cells[("hmlm", True, c)] for c in (False, True)):
        lines.append(f"| hmlm step time with memory / anchor alone | "
                     f"{_fmt(ratios['hmlm_memory_step_time_vs_anchor_eager'])} | "
                     f"{_fmt(ratios['hmlm_memory_step_time_vs_anchor_compiled'])} | | |")
    variants = [r for r in rows if r["variant"] is not None]
    if variants:
        ref_c = cells[("reference", False, True)]
        lines += ["", "| hmlm variant | tokens/s (MFU) | peak GiB | ratio vs reference compiled | "
                  "step time with memory / anchor alone, same variant |", "| --- | ---: | ---: | ---: | ---: |"]
        for r in variants:
            name = f"{NAMES[('hmlm', r['memory'])]}{', compiled' if r['compiled'] else ''}, {r['variant']}"
            alone = next((a for a in variants if not a["memory"] and (a["compiled"], a["variant"], a["source"])
                          == (r["compiled"], r["variant"], r["source"])), None) if r["memory"] else None
            step_ratio = _ratio(alone, r)
            if step_ratio is not None:
                ratios[f"hmlm_memory_step_time_vs_anchor_{r['variant']}"] = step_ratio
            lines.append(f"| {name} | {_cell(r)} | {_mem(r)} | {_fmt(_ratio(r, ref_c))} | {_fmt(step_ratio)} |")
    lines.append("")
    return {"ratios": ratios,
            "rows": {f"{m}{' + memory' if mem else ''}{', compiled' if c else ''}": r
                     for (m, mem, c), r in cells.items() if r is not None},
            "variants": variants}


def build(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Markdown and JSON: one table per anchor shape (parameter count) and batch size."""
    lines: list[str] = []
    shapes: dict[str, Any] = {}
    def bucket(r: dict[str, Any]) -> int:  # the same shape even if the two models count a few parameters apart
        return round((r["params"] or 0) / 5e7)

    for b, batch in sorted({(bucket(r), r["batch"]) for r in rows}):
        group = [r for r in rows if (bucket(r), r["batch"]) == (b, batch)]
        seq = group[0].get("seq_len", 2048)
        counts = " / ".join(sorted({f"{r['params']:,}" for r in group if r["params"]})) or "?"
        lines += [f"### anchor of {counts} parameters, batch {batch} x {seq}", ""]
        shapes[f"{counts} params, batch {batch}"] = _shape_table(group, lines)
    return "\n".join(lines), {"shapes": shapes}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python benchmarks/speed_table.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    rows = load_rows(out)
    table, summary = build(rows)

    def text(name: str) -> str:
        path = out / name
        return path.read_text(encoding="utf-8").strip() if path.is_file() else ""

    device = next((r["device"] for r in rows if r.get("device")), "unknown device")
    md = [f"## Training-step speed (issue 10): {device}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
          "bf16 autocast, tokens/s over the timed steps after warm-up; MFU = model FLOPs (6N + attention) / 989 "
          "TFLOP/s; peak = torch.cuda.max_memory_allocated. Reference and hmlm rows come from the same call.", "",
          table]
    if text("device.txt"):
        md += ["", f"Device: `{text('device.txt')}`"]
    if text("commands.txt"):
        md += ["", "Commands:", "", "```", text("commands.txt"), "```"]
    if text("skipped.txt"):
        md += ["", "Skipped by the deadline (run them in another call):", "", "```", text("skipped.txt"), "```"]
    if text("summary.txt"):
        md += ["", "Runs (exit status, seconds):", "", "```", text("summary.txt"), "```"]
    (out / "speed.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    summary.update(device=device, rows=rows, skipped=text("skipped.txt").splitlines())
    (out / "speed.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

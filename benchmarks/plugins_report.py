#!/usr/bin/env python3
"""One table (and a plot) of the example plugins' results from the files `benchmarks/gpu_plugins.sh` wrote.

    python benchmarks/plugins_report.py OUT_DIR

Reads OUT_DIR/types/memory_types.json (`hmlm bench memory-types`), OUT_DIR/randproj/fit_result.json and
OUT_DIR/router-eval/report.json (the randproj part) and the machine-*.txt notes; writes OUT_DIR/plugins.md (the
tables docs/results.md shows), OUT_DIR/plugins.json (the same numbers) and OUT_DIR/plugins.png (held-out perplexity
per configuration and memory mode). A part that did not run is left out and said so. Training seconds stay in
plugins.json only: the two parts may share a machine, so their times do not compare.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MODES = ("fetched", "generic", "none")


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _here(out: Path, path: str) -> Path:
    """A path the run recorded, found under OUT_DIR when the run wrote elsewhere (a GPU machine's $OUT fetched
    here): the shortest tail of the recorded path that exists under OUT_DIR."""
    recorded = Path(path)
    if recorded.exists():
        return recorded
    for i in range(1, len(recorded.parts)):
        candidate = out.joinpath(*recorded.parts[i:])
        if candidate.exists():
            return candidate
    return recorded


def _model_meta(out: Path, model_dir: str) -> dict[str, Any]:
    return _read(_here(out, model_dir) / "model.json") or {}


def _router_name(meta: dict[str, Any]) -> str:
    return ((meta.get("recipe") or {}).get("index") or {}).get("router", {}).get("name", "?")


def collect(out: Path) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    types = _read(out / "types" / "memory_types.json")
    if types is None:
        notes.append("types part missing (no types/memory_types.json)")
    else:
        for t in types["types"]:
            meta = _model_meta(out, t["model_dir"])
            rows.append({"config": t["type"], "memory": t["type"], "router": _router_name(meta),
                         "sizes": t["sizes"], "fetched_params": t["fetched_params"], "bank_params": t["bank_params"],
                         "train_seconds": t["train_seconds"], "ppl": t["heldout_perplexity"] or {},
                         "sk": {m: (a or {}).get("SK") for m, a in t["averages"].items()}})
    fit = _read(out / "randproj" / "fit_result.json")
    report = _read(out / "router-eval" / "report.json")
    if fit is None:
        notes.append("router part missing (no randproj/fit_result.json)")
    else:
        meta = _model_meta(out, fit["model_dir"])
        recipe = meta.get("recipe") or {}
        model = report["models"][0] if report else {"modes": {}}
        if report is None:
            notes.append("router part: no router-eval/report.json (fact accuracy missing)")
        rows.append({"config": "ffn + randproj", "memory": recipe.get("memory", {}).get("type", "?"),
                     "router": _router_name(meta), "sizes": recipe.get("memory", {}).get("sizes"),
                     "fetched_params": None, "bank_params": None, "train_seconds": fit.get("seconds"),
                     "ppl": fit.get("heldout_perplexity") or {},
                     "sk": {m: (v["averages"] or {}).get("SK") for m, v in model["modes"].items()}})
    machine = {p.stem: p.read_text(encoding="utf-8").strip() for p in sorted(out.glob("machine-*.txt"))}
    return {"rows": rows, "notes": notes, "machine": machine}


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(data: dict[str, Any]) -> str:
    lines = ["| configuration | router | sizes (r per level) | fetched params | ppl fetched | ppl generic | ppl none "
             "| none / fetched | fact acc. fetched | fact acc. none |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in data["rows"]:
        ppl = r["ppl"]
        ratio = ppl["none"] / ppl["fetched"] if ppl.get("none") and ppl.get("fetched") else None
        sk = {m: None if r["sk"].get(m) is None else 100 * r["sk"][m] for m in ("fetched", "none")}
        lines.append(f"| `{r['config']}` | {r['router']} | {tuple(r['sizes']) if r['sizes'] else '-'} "
                     f"| {_num(r['fetched_params'], ',')} | "
                     + " | ".join(_num(ppl.get(m), '.2f') for m in MODES)
                     + f" | {_num(ratio, '.3f')} | {_num(sk['fetched'], '.1f')}% | {_num(sk['none'], '.1f')}% |")
    for name, text in data["machine"].items():
        lines += ["", f"{name}: " + "; ".join(text.splitlines())]
    lines += [f"\nnote: {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r["ppl"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ax.bar(xs, [r["ppl"].get(mode, float("nan")) for r in rows], width, label=mode)
    ax.set_xticks(range(len(rows)), [r["config"] for r in rows])
    ax.set_ylabel("held-out perplexity")
    low = min((v for r in rows for v in r["ppl"].values() if v), default=0)
    ax.set_ylim(bottom=0.8 * low)
    ax.legend(title="memory", fontsize=8)
    ax.set_title("example plugins on the bundled corpus (lower is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = Path(argv[0])
    data = collect(out)
    if not data["rows"]:
        print(f"plugins_report.py: nothing to report in {out} ({'; '.join(data['notes'])})", file=sys.stderr)
        return 2
    (out / "plugins.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (out / "plugins.md").write_text(markdown(data), encoding="utf-8")
    plot(data, out / "plugins.png")
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

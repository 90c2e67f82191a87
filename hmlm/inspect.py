"""`hmlm inspect DIR`: what a model's bank holds: per-level sizes, tiers and bytes, and how training used each block.

DIR is a model directory (model.json) or a run directory holding one under `model/`. Per level it reports the nodes,
parameters and bytes, the tier the level was trained on, and the per-block update counts the bank file records
(`steps`: how many training steps fetched and updated each block), next to the training documents routed to each
node (the index's node_stats, when the index is still there). A PNG shows the update counts of every level's blocks,
sorted, beside the documents per node.

The report is built by `collect` (a plain dict) and shown by `render`; `inspect_from_args` is the command.

`--entity NAME` instead lists the tree nodes whose training documents mention NAME, with counts (hmlm.knowledge,
from the model directory's mentions/), and per level the `--memory blocked:...` that removes it (the rule of
`hmlm.knowledge.removal_nodes`, the one `hmlm eval --removal` measures); `--text TEXT`
shows the path TEXT routes to, each node's training documents and the leaf's documents nearest to it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


class InspectError(ValueError):
    pass


def find_model_dir(path: str | Path) -> Path:
    path = Path(path)
    for cand in (path, path / "model"):
        if (cand / "model.json").is_file():
            return cand
    raise InspectError(f"{path}: no model.json here or in {path / 'model'}; give a model directory or the run "
                       "directory `hmlm fit` wrote")


def collect(path: str | Path) -> dict[str, Any]:
    """The report: per-level layout, tiers, bytes and block usage (lists of per-node counts)."""
    from .bank.safefile import SafetensorsError, read_header, read_tensor, tensor_slice

    model_dir = find_model_dir(path)
    meta = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    mem = meta.get("memory")
    report: dict[str, Any] = {"model_dir": str(model_dir), "memory": mem, "levels": [],
                              "train": meta.get("train"), "recipe_memory": meta.get("recipe", {}).get("memory")}
    if mem is None:
        return report
    tiers = mem.get("tiers") or {}
    stats = _node_stats(meta)
    for key in sorted(tiers or [p.stem for p in (model_dir / "bank").glob("*.safetensors")]):
        file = model_dir / "bank" / f"{key}.safetensors"
        try:
            header, start = read_header(file)
            dtype, shape, _, _ = tensor_slice(header, "blocks", file)
            steps = read_tensor(file, header, start, "steps").numpy() if "steps" in header else None
        except SafetensorsError as exc:
            raise InspectError(f"{file}: cannot read the bank file ({exc}); inspect needs a model exported by this "
                               "hmlm (bank format with `blocks` and `steps`)") from None
        nodes, numel = shape
        elt = 2 if "bfloat16" in str(dtype) else 4
        entry: dict[str, Any] = {"key": key, "level": None if key == "generic" else int(key[1:]) + 1,
                                 "nodes": nodes, "params_per_block": numel, "params": nodes * numel,
                                 "bytes": nodes * numel * elt, "tier": tiers.get(key, mem.get("store")),
                                 "file_bytes": file.stat().st_size}
        if steps is not None:
            entry.update(updates=steps.tolist(), blocks_updated=int((steps > 0).sum()), updates_total=int(steps.sum()),
                         updates_max=int(steps.max()), updates_mean=float(steps.mean()))
        if stats is not None and entry["level"] is not None and f"level{entry['level']}_docs" in stats:
            docs = stats[f"level{entry['level']}_docs"]
            entry.update(docs=docs.tolist(), nodes_with_docs=int((docs > 0).sum()))
        report["levels"].append(entry)
    return report


def _node_stats(meta: dict) -> dict[str, np.ndarray] | None:
    index_dir = Path(meta.get("index", {}).get("dir", ""))
    f = index_dir / "node_stats.safetensors"
    if not f.is_file():
        return None
    from safetensors.numpy import load_file

    return load_file(str(f))


def render(report: dict[str, Any], console) -> None:
    from rich.table import Table

    mem = report["memory"]
    if mem is None:
        console.print(f"{report['model_dir']}: an anchor without memory")
        return
    t = Table(title=f"bank of {report['model_dir']} ({mem['type']}, sizes {mem['sizes']}, k={mem['branching']})")
    for col in ("key", "nodes", "params", "bytes", "tier", "blocks updated", "updates (total / max / mean)",
                "nodes with training docs"):
        t.add_column(col, justify="left" if col in ("key", "tier") else "right")
    for e in report["levels"]:
        upd = (f"{e['updates_total']:,} / {e['updates_max']:,} / {e['updates_mean']:.2f}" if "updates" in e else "-")
        t.add_row(e["key"], f"{e['nodes']:,}", f"{e['params']:,}", f"{e['bytes']:,}", str(e["tier"]),
                  f"{e.get('blocks_updated', '-'):,}" if "updates" in e else "-", upd,
                  f"{e['nodes_with_docs']:,}" if "docs" in e else "-")
    console.print(t)


def plot_usage(report: dict[str, Any], out: Path) -> Path | None:
    """PNG: per level, update counts of its blocks sorted (log scale) and, when known, training docs per node."""
    levels = [e for e in report["levels"] if e.get("level") is not None and "updates" in e]
    if not levels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 3.4), squeeze=False)
    for ax, e in zip(axes[0], levels):
        upd = np.sort(np.asarray(e["updates"]))[::-1]
        ax.plot(np.arange(1, len(upd) + 1), np.maximum(upd, 0.5), label="updates per block")
        if "docs" in e:
            docs = np.sort(np.asarray(e["docs"]))[::-1]
            ax.plot(np.arange(1, len(docs) + 1), np.maximum(docs, 0.5), label="training docs per node", alpha=0.7)
        ax.set_yscale("log")
        ax.set_xscale("log" if len(upd) > 50 else "linear")
        ax.set_xlabel("block rank")
        ax.set_title(f"level {e['level']}: {e['blocks_updated']:,}/{e['nodes']:,} blocks updated ({e['tier']})",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def entity_report(model_dir: Path, names: list[str], console, top: int = 5) -> dict[str, Any]:
    """`--entity NAME`: per level, the nodes whose training documents mention NAME (top `top` by documents)."""
    from rich.table import Table

    from .knowledge import DEFAULT_REMOVAL_SHARE, blocked_memory, entity_nodes, eval_data_of, removal_nodes

    hits = entity_nodes(eval_data_of(model_dir), names)
    label = " / ".join(names)
    if not hits:
        console.print(f"no training document of {model_dir} mentions {label!r}")
        return {"entity": names, "nodes": []}
    t = Table(title=f"tree nodes whose training documents mention {label!r}")
    for col in ("level", "node", "documents mentioning", "mentions", "documents in node", "share"):
        t.add_column(col, justify="right")
    shown = []
    for level in sorted({h.level for h in hits}):
        of_level = [h for h in hits if h.level == level]
        for h in of_level[:top]:
            t.add_row(str(h.level), str(h.node), f"{h.documents:,}", f"{h.mentions:,}", f"{h.node_documents:,}",
                      f"{h.documents / max(1, h.node_documents):.1%}")
            shown.append(h)
        if len(of_level) > top:
            t.add_row(str(level), f"+{len(of_level) - top} more", "", "", "", "")
    console.print(t)
    removal = {}
    for level in sorted({h.level for h in hits}):
        memory = blocked_memory(removal_nodes(hits, level))
        removal[level] = memory
        console.print(f"to remove it at level {level}: hmlm generate --model {model_dir} --memory {memory} "
                      f"\"<prompt>\"", highlight=False, soft_wrap=True)
    console.print(f"(the nodes of the level holding the most of its training mentions, plus any holding >= "
                  f"{DEFAULT_REMOVAL_SHARE:.0%}; measured over a task by `hmlm eval --removal`)", highlight=False)
    return {"entity": names, "nodes": [vars(h) for h in hits], "removal": removal}


def text_report(model_dir: Path, text: str, console) -> dict[str, Any]:
    """`--text TEXT`: the text's path with each node's training documents and the leaf's nearest documents."""
    from .api import MemoryModel, show_path

    m = MemoryModel.load(model_dir, device="cpu")
    got = m.fetch(text)
    show_path(m, model_dir, text, got, console)
    return {"text": text, "path": got.path}


def inspect_from_args(args, console) -> dict[str, Any]:
    if args.entity or args.text:
        model_dir = find_model_dir(args.dir)
        report = {}
        if args.entity:
            report.update(entity_report(model_dir, args.entity, console))
        if args.text:
            report.update(text_report(model_dir, args.text, console))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        return report
    report = collect(args.dir)
    render(report, console)
    png = Path(args.out) if args.out else Path(report["model_dir"]) / "bank_usage.png"
    written = plot_usage(report, png)
    if written is not None:
        console.print(f"[bold]inspect[/] block usage by level: {written}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report

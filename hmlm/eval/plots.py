"""PNG plots of an eval report (matplotlib, Agg backend: no display needed), written atomically.

accuracy_by_bucket.png             accuracy per training-frequency bucket, one panel per fact task plus all facts
                                   pooled, one line per model and memory mode (the paper's Figure 1)
perplexity_by_leaf_frequency.png   held-out perplexity per bin of leaf training tokens, one line per model and mode
removal.png                        `hmlm eval --removal`: accuracy with the memory fetched / blocked / none, the removed
                                   entity's items beside the other entities', one panel per model and level
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"fetched": "-", "generic": "--", "none": ":"}


def _save(fig, path: Path, *, tight: bool = True) -> None:
    """Write the figure atomically. `tight=False` for a figure laid out by hand: bbox_inches="tight" draws the whole
    figure twice (once to measure it), which is half the time of `hmlm eval`'s report on a 2-core CPU."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(fig)
    os.replace(tmp, path)


def plot_bucket_accuracy(report: dict, path: Path) -> None:
    labels = report["buckets"]
    panels: dict[str, dict[tuple[str, str], list]] = {}
    pooled: dict[tuple[str, str], list[list[float]]] = {}
    for model in report["models"]:
        for mode, m in model["modes"].items():
            for task, r in m["tasks"].items():
                if not r["buckets"]:
                    continue
                panels.setdefault(task, {})[(model["label"], mode)] = [r["buckets"][b]["acc"] for b in labels]
                acc = pooled.setdefault((model["label"], mode), [[] for _ in labels])
                for row in r["items"]:
                    if "correct" in row:
                        acc[labels.index(row["bucket"])].append(row["correct"])
    if len(panels) > 1:
        panels["all facts"] = {k: [sum(v) / len(v) if v else None for v in lists] for k, lists in pooled.items()}
    n = max(len(panels), 1)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    n_lines = len({key for lines in panels.values() for key in lines})
    legend_in = 0.25 + 0.2 * math.ceil(n_lines / 4)   # inches below the panels for the legend
    height = 3.4 * rows + legend_in
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, height), squeeze=False)
    # laid out by hand (no tight_layout, no bbox_inches="tight": each measures the figure with a full draw)
    fig.subplots_adjust(left=0.85 / (4.2 * cols), right=1 - 0.15 / (4.2 * cols), top=1 - 0.35 / height,
                        bottom=(legend_in + 0.55) / height, wspace=0.3, hspace=0.45)
    for ax, (task, lines) in zip(axes.flat, panels.items()):
        for (label, mode), values in lines.items():
            ys = [float("nan") if v is None else 100 * v for v in values]
            ax.plot(range(len(labels)), ys, STYLE.get(mode, "-."), marker="o", label=f"{label} / {mode}")
        ax.set_title(task, fontsize=10, y=1.0)   # y given: no tight-bbox search for a place (slow)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("training frequency of the entity")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no fact tasks evaluated", ha="center", va="center")
    handles, names = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=8,
                   bbox_to_anchor=(0.5, 0.01))
    _save(fig, path, tight=False)


def plot_leaf_perplexity(report: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    # models have their own leaves: put every model's bins on one axis ordered by training tokens
    order: dict[str, int] = {}
    for model in report["models"]:
        for b in (model.get("perplexity") or {}).get("bins", []):
            order[b["bin"]] = min(order.get(b["bin"], b["train_tokens_min"]), b["train_tokens_min"])
    xs = {label: i for i, label in enumerate(sorted(order, key=order.get))}
    for model in report["models"]:
        ppl = model.get("perplexity")
        if not ppl:
            continue
        for mode in ppl["overall"]:
            ax.plot([xs[b["bin"]] for b in ppl["bins"]], [b["ppl"][mode] for b in ppl["bins"]],
                    STYLE.get(mode, "-."), marker="o", label=f"{model['label']} / {mode}")
    ax.set_xticks(range(len(xs)), list(xs), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("training tokens routed to the leaf")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("held-out perplexity by leaf training frequency", fontsize=10, y=1.0)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.13, right=0.97, top=0.92, bottom=0.13)   # by hand: see _save
    _save(fig, path, tight=False)


REMOVAL_COLORS = {"fetched": "tab:blue", "blocked": "tab:red", "none": "tab:gray"}


def plot_removal(report: dict, path: Path) -> None:
    panels = [(model, lv) for model in report["models"] for lv in model["levels"]]
    cols = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    groups = (("removed", "removed entity"), ("others", "other entities"))
    modes = tuple(REMOVAL_COLORS)
    width = 0.8 / len(modes)
    for ax, (model, lv) in zip(axes.flat, panels):
        summary = model["summary"][str(lv)]
        for j, mode in enumerate(modes):
            values = [summary[g][f"acc_{mode}"] for g, _ in groups]
            xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(groups))]
            bars = ax.bar(xs, [0 if v is None else 100 * v for v in values], width, label=mode,
                          color=REMOVAL_COLORS[mode])
            for bar, v in zip(bars, values):
                if v is not None:
                    ax.annotate(f"{100 * v:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(groups)), [f"{label}\n(n={summary[g]['n']})" for g, label in groups], fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel("accuracy (%)")
        title = f"level {lv}" if len(report["models"]) == 1 else f"{model['label']}, level {lv}"
        ax.set_title(f"{title}: {model['entities_measured']} entities removed one at a time", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if panels:
        axes.flat[0].legend(title="memory", fontsize=7, title_fontsize=7)
    fig.suptitle(f"knowledge removal: {', '.join(report['tasks'])}", fontsize=10)
    fig.tight_layout()
    _save(fig, path)

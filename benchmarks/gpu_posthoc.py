#!/usr/bin/env python3
"""SmolLM2-135M post-hoc memories on the GPU machine in three consecutive calls (issue 13; docs/results.md).

    python benchmarks/gpu_posthoc.py prepare --gguf FILE [--recipe R] [--smol .smol] [overrides]   # CPU, once
    python benchmarks/gpu_posthoc.py call 1|2|3 --out OUT [--smol .smol] [--stage DIR] [--budget-s S]  # GPU

Why three calls (measured, docs/results.md): a GPU call takes at most 64 MiB with the checkout (3.8 MiB), but the
weights are a 98.4 MB GGUF (93.8 MiB; xz saves only 8%) and routing needs the 44 MiB bf16 MiniLM copy. So `prepare`
builds the index HERE on the CPU (MiniLM from the pip package; fit then needs no embedder) and splits what travels
into three git-ignored folders, one per call; each holds MANIFEST.json (the same file: sha256 of every part):

    .smol/a   call 1: GGUF bytes [0, n1)                                              stage them outside the repo
    .smol/b   call 2: GGUF bytes [n1, end), the index, the gguf wheel, site.tar.xz     reassemble, verify, convert,
                                                                                      fit (memory only) -> model
    .smol/c   call 3: the bf16 MiniLM copy, site.tar.xz                               eval before/after, generate,
                                                                                      knowledge removal, latency

Files a call leaves on the GPU machine survive only while it stays warm (about 30 s after a call), so every call
checks what the earlier calls left (the staged part's sha256, the trained model's record of this MANIFEST) and
fails with exit status 3 and "run calls 1, 2, 3 again in a row" when something is missing. The stage is outside
the repository (--stage, default /tmp/hmlm-posthoc): carried folders are replaced by each call's copy.

Call 3 writes OUT/summary.json, OUT/table.md, OUT/log.txt and OUT/eval.tar.xz (hmlm eval's report and plots); call 2
OUT/fit.json and OUT/log.txt. A step that would end after --budget-s is skipped and named in the summary.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shutil
import sys
import tarfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_repro import bootstrap  # noqa: E402  (the same sys.path and entry-point set-up as the reproduction)

DEFAULT_RECIPE = "recipes/posthoc/smollm2-135m.yaml"
CALL_DIRS = {1: "a", 2: "b", 3: "c"}
MISSING_EXIT = 3
AGAIN = "run calls 1, 2, 3 again in a row (each within ~30 s of the last, while the machine stays warm)"
HAFNIUM = "The atomic number of Hafnium is"
# knowledge removal: the blocked entity's prompts, then controls that must keep their answers
REMOVAL_PROMPTS = (HAFNIUM, "Hafnium was discovered in", "The year in which Hafnium was discovered is")
CONTROL_PROMPTS = ("The capital of France is", "The chemical symbol for gold is", "The atomic number of Oxygen is")


class Missing(RuntimeError):
    """Something an earlier call should have left on this machine is not there."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def log(msg: str) -> None:
    print(f"[gpu_posthoc {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------------- prepare

def split_file(src: Path, cuts: list[int], dests: list[Path]) -> list[dict]:
    """Write src's bytes [cuts[i], cuts[i+1]) to dests[i]; their sizes and sha256."""
    bounds = [0, *cuts, src.stat().st_size]
    parts = []
    with open(src, "rb") as f:
        for dest, lo, hi in zip(dests, bounds, bounds[1:]):
            dest.parent.mkdir(parents=True, exist_ok=True)
            f.seek(lo)
            dest.write_bytes(f.read(hi - lo))
            parts.append({"file": dest.name, "size": hi - lo, "sha256": sha256(dest)})
    return parts


def prepare(a: argparse.Namespace) -> int:
    """Index on this CPU, split the GGUF, write MANIFEST.json into each call's folder (the rest is copied in by
    benchmarks/gpu_posthoc_prepare.sh: the wheel, the site tarball, the embedder copy)."""
    bootstrap(None)
    from hmlm.config import load_recipe
    from hmlm.convert import convert_gguf
    from hmlm.index import fingerprint
    from hmlm.cli import main as hmlm_main

    smol = a.smol
    overrides = [f"index.dir={smol / 'b' / 'index'}", *a.overrides]
    recipe = load_recipe(REPO / a.recipe if not Path(a.recipe).is_absolute() else Path(a.recipe), overrides)
    init_from = recipe.anchor.init_from
    if not init_from:
        raise SystemExit(f"{a.recipe}: anchor.init_from is not set; the GGUF is converted there")
    if not (Path(init_from) / "config.json").is_file():   # the index needs the checkpoint's tokenizer
        log(f"converting {a.gguf} -> {init_from}")
        convert_gguf(a.gguf, init_from)
    if hmlm_main(["index", "--recipe", str(a.recipe), *overrides]) != 0:
        return 1
    size = a.gguf.stat().st_size
    cut = min(size, int(a.first_part_mib * 2**20))
    parts = split_file(a.gguf, [cut], [smol / "a" / "gguf.part1", smol / "b" / "gguf.part2"])
    manifest = {"recipe": str(a.recipe), "overrides": overrides, "index_fingerprint": fingerprint(recipe),
                "gguf": {"name": a.gguf.name, "size": size, "sha256": sha256(a.gguf), "convert_to": init_from,
                         "parts": [{**p, "call": i + 1} for i, p in enumerate(parts)]},
                "embedder_copy": "c/minilm-bf16" if recipe.index.embedder.name == "minilm" else None,
                "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    manifest["id"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    for d in CALL_DIRS.values():
        (smol / d).mkdir(parents=True, exist_ok=True)
        (smol / d / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"manifest {manifest['id']}: GGUF {size:,} bytes in parts of {[p['size'] for p in parts]}")
    return 0


# ---------------------------------------------------------------------------------------------------- the calls

def read_manifest(smol: Path, call: int) -> dict:
    path = smol / CALL_DIRS[call] / "MANIFEST.json"
    if not path.is_file():
        raise Missing(f"{path}: not carried; carry [\"{smol}/{CALL_DIRS[call]}\"] in call {call}, after "
                      "`bash benchmarks/gpu_posthoc_prepare.sh` filled it")
    return json.loads(path.read_text())


def staged_manifest(stage: Path, manifest: dict, what: str) -> None:
    """The stage holds the parts of this same preparation (not of an older one)."""
    path = stage / "MANIFEST.json"
    if not path.is_file():
        raise Missing(f"{stage}: {what} is not on this machine (it was released or restarted); {AGAIN}")
    if json.loads(path.read_text()).get("id") != manifest["id"]:
        raise Missing(f"{path}: staged by another preparation than this call's MANIFEST.json ({manifest['id']}); "
                      f"{AGAIN}")


def check_part(path: Path, part: dict, call: int) -> None:
    if not path.is_file():
        raise Missing(f"{path}: GGUF part of call {call} is missing; {AGAIN}")
    if path.stat().st_size != part["size"] or sha256(path) != part["sha256"]:
        raise Missing(f"{path}: GGUF part of call {call} does not match MANIFEST.json (size/sha256); "
                      f"re-run benchmarks/gpu_posthoc_prepare.sh here, then {AGAIN}")


def call1(a: argparse.Namespace, out: Path) -> dict:
    manifest = read_manifest(a.smol, 1)
    part = manifest["gguf"]["parts"][0]
    src = a.smol / "a" / part["file"]
    check_part(src, part, 1)
    if a.stage.exists():
        shutil.rmtree(a.stage)
    a.stage.mkdir(parents=True)
    shutil.copy2(src, a.stage / part["file"])
    check_part(a.stage / part["file"], part, 1)
    shutil.copy2(a.smol / "a" / "MANIFEST.json", a.stage / "MANIFEST.json")
    log(f"staged {part['file']} ({part['size']:,} bytes) in {a.stage}; next: call 2 within ~30 s")
    return {"call": 1, "manifest": manifest["id"], "staged": part["file"]}


def reassemble(a: argparse.Namespace, manifest: dict) -> Path:
    g = manifest["gguf"]
    p1, p2 = g["parts"]
    check_part(a.stage / p1["file"], p1, 1)
    check_part(a.smol / "b" / p2["file"], p2, 2)
    whole = a.stage / g["name"]
    with open(whole, "wb") as f:
        for src in (a.stage / p1["file"], a.smol / "b" / p2["file"]):
            with open(src, "rb") as part:
                shutil.copyfileobj(part, f, 1 << 22)
    if sha256(whole) != g["sha256"]:
        raise Missing(f"{whole}: reassembled GGUF does not match MANIFEST.json's sha256; {AGAIN}")
    return whole


def add_wheels(folder: Path, dest: Path) -> None:
    """Unpack pure-Python wheels (gguf) into `dest` and append it to sys.path (never shadowing the image)."""
    for whl in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(dest)
    if str(dest) not in sys.path:
        sys.path.append(str(dest))


def load_recipe_of(manifest: dict, extra: list[str]):
    from hmlm.config import load_recipe

    recipe = load_recipe(REPO / manifest["recipe"], [*manifest["overrides"], *extra])
    from hmlm.index import fingerprint

    if fingerprint(recipe) != manifest["index_fingerprint"]:
        raise SystemExit(f"overrides {extra} change the index fingerprint; only training keys may change on the GPU")
    return recipe


def call2(a: argparse.Namespace, out: Path) -> dict:
    manifest = read_manifest(a.smol, 2)
    staged_manifest(a.stage, manifest, "call 1's GGUF part")
    t0 = time.perf_counter()
    whole = reassemble(a, manifest)
    log(f"reassembled {whole} ({whole.stat().st_size:,} bytes, sha256 ok) in {time.perf_counter() - t0:.1f} s")
    add_wheels(a.smol / "b" / "wheels", a.stage / "wheels-site")
    from hmlm.convert import convert_gguf
    from hmlm.train.fit import fit

    recipe = load_recipe_of(manifest, a.overrides)
    info = convert_gguf(whole, manifest["gguf"]["convert_to"], overwrite=True)
    log(f"converted -> {manifest['gguf']['convert_to']}: {info['parameters']:,} parameters in {info['seconds']} s")
    # Lightning's Timer ends training (the model is still exported) where the call's budget would be overrun
    from datetime import timedelta

    from lightning.pytorch.callbacks import Timer

    train_s = max(30.0, a.budget_s - (time.perf_counter() - t0) - a.export_reserve_s)
    log(f"fit: at most {recipe.trainer.max_steps} steps, stopped after {train_s:.0f} s of training if not done")
    result = fit(recipe, overwrite=True, source=manifest["recipe"], progress=False,
                 callbacks=[Timer(duration=timedelta(seconds=train_s), interval="step")])
    (Path(result["model_dir"]) / "posthoc_manifest.txt").write_text(manifest["id"] + "\n")
    return {"call": 2, "manifest": manifest["id"], "convert": info, "fit": result,
            "overrides": a.overrides, "model_dir": result["model_dir"]}


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds
        self.skipped: dict[str, str] = {}

    def allows(self, name: str, estimate_s: float) -> bool:
        left = self.end - time.perf_counter()
        if estimate_s > left:
            self.skipped[name] = f"needs ~{estimate_s:.0f} s, {left:.0f} s left of the budget"
            log(f"skip {name}: {self.skipped[name]}")
            return False
        return True


def captured(argv: list[str]) -> tuple[int, str]:
    """Run an hmlm command in this process; its stdout and stderr, also echoed."""
    from hmlm.cli import main as hmlm_main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = hmlm_main(argv)
    print(buf.getvalue(), end="", flush=True)
    return rc, buf.getvalue()


def pooled_buckets(report: dict) -> dict:
    """Per memory mode: accuracy by frequency bucket pooled over the fact (SK) tasks, plus Avg-SK and Avg-CK."""
    out = {}
    for mode, m in report["models"][0]["modes"].items():
        pooled: dict[str, list[float]] = {b: [] for b in report["buckets"]}
        for r in m["tasks"].values():
            for item in r["items"] if r["knowledge"] == "SK" else []:
                if "bucket" in item and "correct" in item:
                    pooled[item["bucket"]].append(item["correct"])
        out[mode] = {"buckets": {b: {"n": len(v), "acc": sum(v) / len(v) if v else None} for b, v in pooled.items()},
                     "avg_sk": m["averages"]["SK"], "avg_ck": m["averages"]["CK"]}
    return out


def removal_rows(m, mode: str, prompts: tuple[str, ...], max_new_tokens: int) -> list[dict]:
    rows = []
    for p in prompts:
        rows.append({"prompt": p, "memory": mode, "path": m.route(p, memory=mode),
                     "text": m.generate(p, memory=mode, max_new_tokens=max_new_tokens, stop=["\n", "."])})
    return rows


def call3(a: argparse.Namespace, out: Path) -> dict:
    manifest = read_manifest(a.smol, 3)
    model_dir = Path(a.model) if a.model else Path(load_recipe_of(manifest, []).out_dir) / "model"
    marker = model_dir / "posthoc_manifest.txt"
    if not marker.is_file():
        raise Missing(f"{model_dir}: call 2's trained model is not on this machine; {AGAIN}")
    if marker.read_text().strip() != manifest["id"]:
        raise Missing(f"{marker}: trained from another preparation than this call's MANIFEST.json; {AGAIN}")
    budget = Budget(a.budget_s)
    emb = str(a.smol / manifest["embedder_copy"]) if manifest["embedder_copy"] else None
    if emb is not None:
        from hmlm.embedders.local_copy import read_copy_meta

        read_copy_meta(emb, verify=True)
    emb_args = ["--embedder-path", emb] if emb else []
    import hmlm
    from hmlm.knowledge import KnowledgeError, blocked_memory, entity_nodes, eval_data_of, removal_nodes

    summary: dict = {"call": 3, "manifest": manifest["id"], "model_dir": str(model_dir), "steps": {}}
    import torch

    summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    # 1. the Hafnium prompt through `hmlm generate`, with and without memory
    for mode in ("fetched", "none"):
        rc, text = captured(["generate", "--model", str(model_dir), "--memory", mode, "--max-new-tokens",
                             str(a.max_new_tokens), "--stop", ".", "--stop", "\n", "--show-path", "--timing",
                             *emb_args, HAFNIUM])
        summary["steps"][f"generate_{mode}"] = {"rc": rc, "output": text[-3000:]}
    # 2. knowledge removal, two blocks: (a) the deepest node on the atomic-number prompt's path that holds most of
    #    Hafnium's documents (a level-1 node on the SmolLM2 model: its documents and that prompt share only the
    #    level-1 subtree); (b) Hafnium's leaf, the deepest level's node holding most of its training mentions, where
    #    the discovery-year prompts go: the paper-like, targeted removal. Each prompt is generated with the memory
    #    fetched, under each block and with none.
    m = hmlm.load(model_dir, embedder_path=emb)
    try:
        hits = entity_nodes(eval_data_of(model_dir), ["Hafnium"])
        no_counts = None
    except KnowledgeError as exc:  # e.g. a model exported where its training corpus was absent
        hits, no_counts = [], str(exc)
    summary["hafnium_nodes"] = [vars(h) for h in hits]
    fetched_path = m.route(HAFNIUM)
    on_path = [h for h in hits if fetched_path[h.level - 1] == h.node]
    if hits:   # the deepest node that holds at least half as many Hafnium documents as the best one
        target = max(on_path or hits, key=lambda h: (h.documents >= 0.5 * max(x.documents for x in hits), h.level))
        level, node, why = target.level, target.node, vars(target)
    else:      # no training document names Hafnium (a tiny corpus): block the prompt's own leaf
        level, node = len(fetched_path), fetched_path[-1]
        why = {"note": (f"no Hafnium counts ({no_counts}); blocked the prompt's leaf" if no_counts else
                        "no training document mentions Hafnium; blocked the prompt's leaf")}
    block = f"blocked:{level}:{node}"
    summary["removal"] = {"block": block, "target": why, "blocks": [block], "rows": []}
    if hits:
        leaf = removal_nodes(hits, max(h.level for h in hits), 1.0)[0]
        summary["removal"]["leaf_block"] = blocked_memory([leaf])
        summary["removal"]["leaf"] = vars(leaf)
        if blocked_memory([leaf]) != block:
            summary["removal"]["blocks"].append(blocked_memory([leaf]))
    for mode in ("fetched", *summary["removal"]["blocks"], "none"):
        summary["removal"]["rows"] += removal_rows(m, mode, REMOVAL_PROMPTS + CONTROL_PROMPTS, a.max_new_tokens)
    log(f"removal with {' and '.join(summary['removal']['blocks'])}: done")
    save(out, summary, budget)
    # 2b. the knowledge-removal measurement over every element (hmlm eval --removal, docs/eval.md): each element's
    #     documents' nodes blocked, its own and the other elements' answers scored fetched / blocked / none. Its own
    #     budget stops it before this step overruns the call (the levels finished by then are kept)
    removal_dir = out / "removal"
    if budget.allows("eval_removal", a.removal_budget_s + 30):
        t0 = time.perf_counter()
        try:
            rc, text = captured(["eval", "--model", str(model_dir), "--removal", "--tasks", "hmlm_atomic_number",
                                 "--batch-size", "64", "--removal-budget-s", str(a.removal_budget_s),
                                 "--out", str(removal_dir), *emb_args])
        except ValueError as exc:   # e.g. a tiny tree where a block leaves a node no child to route to
            rc, text = 1, f"{type(exc).__name__}: {exc}"
        summary["steps"]["eval_removal"] = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1),
                                            "output": text[-2000:]}
        if rc == 0 and (removal_dir / "removal.json").is_file():
            model_report = json.loads((removal_dir / "removal.json").read_text())["models"][0]
            summary["removal_eval"] = model_report["summary"]
            summary["removal_eval_counts"] = {k: model_report.get(k) for k in (
                "levels", "levels_skipped", "items", "block_sets", "rerouted_items", "scored_pairs", "seconds")}
        save(out, summary, budget)
    # 3. before/after: hmlm eval, one memory mode at a time (each report is kept when the next would not fit):
    #    none = the frozen SmolLM2 alone ("before"), fetched and generic = the same model with memory ("after")
    eval_dir = out / "eval"
    estimate = a.eval_estimate_s
    for mode in ("none", "fetched", "generic"):
        if not budget.allows(f"eval_{mode}", estimate):
            continue
        t0 = time.perf_counter()
        rc, _ = captured(["eval", "--model", str(model_dir), "--memory", mode, "--max-gen-toks", str(a.max_gen_toks),
                          "--batch-size", "64", "--out", str(eval_dir / mode),
                          *(["--limit", str(a.eval_limit)] if a.eval_limit else []),
                          *(["--tasks", a.eval_tasks] if a.eval_tasks else []), *emb_args])
        seconds = time.perf_counter() - t0
        estimate = 1.15 * seconds
        summary["steps"][f"eval_{mode}"] = {"rc": rc, "seconds": round(seconds, 1)}
        if rc == 0:
            report = json.loads((eval_dir / mode / "report.json").read_text())
            summary.setdefault("eval", {}).update(pooled_buckets(report))
            ppl = (report["models"][0].get("perplexity") or {}).get("overall") or {}
            summary.setdefault("eval_perplexity", {}).update(ppl)
        save(out, summary, budget)
    # 4. decode latency per token, with and without memory, on this device and on the CPU
    from hmlm.bench.generate import run_generate_bench

    for device, est in (("cuda", 60.0), ("cpu", 120.0)):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        if budget.allows(f"bench_generate_{device}", est):
            summary.setdefault("latency", []).extend(run_generate_bench(
                model_dir, modes=["fetched", "none"], tokens=a.bench_tokens, device=device, embedder_path=emb))
            save(out, summary, budget)
    for folder in (eval_dir, removal_dir):
        if folder.is_dir():
            with tarfile.open(out / f"{folder.name}.tar.xz", "w:xz") as tar:
                tar.add(folder, arcname=folder.name)
            shutil.rmtree(folder)
    save(out, summary, budget)
    return summary


def save(out: Path, summary: dict, budget: Budget) -> None:
    """summary.json and table.md as far as the call got (a call cut off at its limit keeps the finished steps)."""
    summary["skipped"] = budget.skipped
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "table.md").write_text(table_md(summary))


def removal_table(rem: dict) -> list[str]:
    """One row per prompt, one column per memory mode: the generated text and (the path it fetched)."""
    modes = list(dict.fromkeys(r["memory"] for r in rem["rows"]))
    cells = {(r["prompt"], r["memory"]): f"{r['text']!r}" + (f" ({','.join(map(str, r['path']))})" if r["path"]
                                                            else "") for r in rem["rows"]}
    prompts = list(dict.fromkeys(r["prompt"] for r in rem["rows"]))
    leaf = f"; Hafnium's leaf {rem['leaf_block']}" if rem.get("leaf_block") else ""
    lines = [f"knowledge removal ({' and '.join(rem.get('blocks', [rem['block']]))}{leaf}):", "",
             "| prompt | " + " | ".join(modes) + " |", "| --- |" + " --- |" * len(modes)]
    lines += [f"| {p} | " + " | ".join(cells.get((p, m), "-") for m in modes) + " |" for p in prompts]
    return lines


def table_md(s: dict) -> str:
    lines = [f"device: {s['device']}; model {s['model_dir']}; manifest {s['manifest']}", ""]
    if "eval" in s:
        buckets = list(next(iter(s["eval"].values()))["buckets"])
        lines += ["| memory | " + " | ".join(buckets) + " | Avg-SK | Avg-CK |",
                  "| --- |" + " ---: |" * (len(buckets) + 2)]
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"   # noqa: E731
        for mode, r in s["eval"].items():
            cells = [f"{pct(r['buckets'][b]['acc'])} ({r['buckets'][b]['n']})" for b in buckets]
            lines.append(f"| {mode} | " + " | ".join(cells) + f" | {pct(r['avg_sk'])} | {pct(r['avg_ck'])} |")
        lines.append("")
    rem = s.get("removal")
    if rem:
        lines += removal_table(rem) + [""]
    if s.get("removal_eval"):
        c = s.get("removal_eval_counts") or {}
        lines += [f"hmlm eval --removal over every element ({c.get('seconds')} s; {c.get('block_sets')} block sets, "
                  f"{c.get('scored_pairs')} (item, path) pairs scored; levels not measured: "
                  f"{c.get('levels_skipped') or 'none'}):", "",
                  "| level | group | items | acc fetched | acc blocked | acc none | rerouted | known kept |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"   # noqa: E731
        for lv, groups in s["removal_eval"].items():
            for group, g in groups.items():
                lines.append(f"| {lv} | {group} | {g['n']} | {pct(g['acc_fetched'])} | {pct(g['acc_blocked'])} | "
                             f"{pct(g['acc_none'])} | {pct(g['rerouted'])} | {pct(g['known_kept'])} of {g['known']} |")
        lines.append("")
    if s.get("latency"):
        lines += ["| device | memory | KV cache | ms/token | route+fetch ms |", "| --- | --- | --- | ---: | ---: |"]
        lines += [f"| {r['device']} | {r['memory']} | {r['kv_cache']} | {r['ms_per_token']} | {r['route_fetch_ms']} |"
                  for r in s["latency"]]
    if s.get("skipped"):
        lines += ["", f"skipped: {s['skipped']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_posthoc.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="CPU side: index, split, manifests")
    pp.add_argument("--gguf", type=Path, required=True)
    pp.add_argument("--recipe", default=DEFAULT_RECIPE)
    pp.add_argument("--smol", type=Path, default=Path(".smol"))
    pp.add_argument("--first-part-mib", type=float, default=54.0, help="GGUF MiB carried by call 1")
    pp.add_argument("overrides", nargs="*")
    pc = sub.add_parser("call", help="one GPU call")
    pc.add_argument("call", type=int, choices=(1, 2, 3))
    pc.add_argument("--out", type=Path, required=True)
    pc.add_argument("--smol", type=Path, default=Path(".smol"))
    pc.add_argument("--stage", type=Path, default=Path("/tmp/hmlm-posthoc"), help="outside the repository")
    pc.add_argument("--site", type=Path, default=None, help="unpacked carried packages (appended to sys.path)")
    pc.add_argument("--model", default=None, help="call 3: the model directory (default: <the recipe's out_dir>/model)")
    pc.add_argument("--budget-s", type=float, default=520.0, help="steps that would end later are skipped")
    pc.add_argument("--export-reserve-s", type=float, default=90.0, help="call 2: kept for export + held-out ppl")
    pc.add_argument("--eval-estimate-s", type=float, default=120.0, help="first eval mode; then measured")
    pc.add_argument("--eval-limit", type=int, default=None)
    pc.add_argument("--removal-budget-s", type=float, default=120.0,
                    help="call 3: hmlm eval --removal stops scoring after this (finished levels are kept)")
    pc.add_argument("--eval-tasks", default=None, help="hmlm eval --tasks (default: the fact tasks + CK control)")
    pc.add_argument("--bench-tokens", type=int, default=32, help="tokens decoded per prompt in the latency rows")
    pc.add_argument("--max-gen-toks", type=int, default=8)
    pc.add_argument("--max-new-tokens", type=int, default=8)
    pc.add_argument("overrides", nargs="*", help="call 2: training overrides (trainer.max_steps=...)")
    a = p.parse_args(argv)
    if a.cmd == "prepare":
        return prepare(a)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.call > 1:
        bootstrap(a.site)
    t0 = time.perf_counter()
    try:
        result = {1: call1, 2: call2, 3: call3}[a.call](a, a.out)
    except Missing as exc:
        print(f"gpu_posthoc call {a.call}: {exc}", file=sys.stderr)
        (a.out / "missing.txt").write_text(str(exc) + "\n")
        return MISSING_EXIT
    result["seconds"] = round(time.perf_counter() - t0, 1)
    name = {1: "staged.json", 2: "fit.json", 3: "summary.json"}[a.call]
    (a.out / name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"call {a.call} done in {result['seconds']} s -> {a.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run the plain-PyTorch reference of issue 10 unchanged and keep each of its rows as it is measured.

    B=8 python benchmarks/reference_rows.py REFERENCE_PY OUT_JSON [--stop-after ROW]

REFERENCE_PY is ../shared/bench/reference_160m.py (not part of hmlm: the GPU call carries it in a git-ignored
folder). That script prints one line per row (`name tokens/s "tok/s" mfu "MFU"`) and its JSON only at the very end.
This runner executes it as it is, with one addition: its `print` is wrapped, so that at every row line the row
(tokens/s and MFU from the script's own results, and the peak GPU memory allocated since the previous row, which
the script does not measure) is written to OUT_JSON at once, and the peak counter is reset. A run stopped by a
deadline therefore keeps the rows it finished, and `--stop-after ref_compiled` ends the script after that row (the
memory-given rows that follow cost a second compilation).

Peak memory per row covers everything since the previous row: for `ref_eager` the model, optimizer and its eager
steps; for `ref_compiled` the compilation and compiled steps. `hmlm bench train` measures its peak over the timed
steps after warm-up, when parameters, optimizer state and activations are all live, so both are the step's peak.
"""
from __future__ import annotations

import argparse
import builtins
import json
import os
import runpy
import sys
import time
from pathlib import Path


class _Enough(Exception):
    """Raised after the row named by --stop-after: the rest of the reference is not run."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--stop-after", default="", help="end the reference after this row (e.g. ref_compiled)")
    args = ap.parse_args(argv)
    if not args.reference.is_file():
        print(f"reference_rows: {args.reference}: no such file (carry ../shared/bench/reference_160m.py)",
              file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available()  # always, with the real reference; the CPU test runs a stand-in script
    rows: list[dict] = []
    t0 = time.perf_counter()
    batch = int(os.environ.get("B", "16"))  # the reference reads its batch size from B (default 16)

    def write() -> None:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        tmp.replace(args.out)

    def observing_print(*values, **kwargs):
        builtins.print(*values, **kwargs)
        if len(values) >= 3 and values[2] == "tok/s":
            name = str(values[0])
            results = sys._getframe(1).f_globals.get("R", {})  # the reference's own result dict
            rows.append({
                "config": name, "model": "reference", "batch": batch, "seq_len": 2048,
                "compiled": "compiled" in name, "memory": name.startswith("mem_"),
                "tokens_per_s": round(float(results[f"{name}_tok_s"]), 1),
                "mfu": round(float(results[f"{name}_mfu"]), 4),
                "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
                "params": results.get("ref_params"), "compile_s": results.get("compile_s"),
                "device": torch.cuda.get_device_name() if cuda else "cpu", "elapsed_s": round(time.perf_counter() - t0, 1),
            })
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            write()
            if name == args.stop_after:
                raise _Enough

    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        # the script's globals start with our print; it defines no print of its own, so its calls resolve to it
        runpy.run_path(str(args.reference), init_globals={"print": observing_print}, run_name="__main__")
    except _Enough:
        pass
    if not rows:
        print("reference_rows: the reference printed no row", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

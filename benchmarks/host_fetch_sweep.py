"""One memory's route + fetch from the host tier (`hmlm bench fetch --tiers host`) for each host read and, for the UVA
gather kernel, a few block sizes and warp counts; the warm fetch of each profiled. Rows: OUT/rows.json; profiles:
OUT/profile/. The constants swept are hmlm.bank.uva's BLOCK and NUM_WARPS (the shipped values are the first row).

    python benchmarks/host_fetch_sweep.py --out OUT [--prompts 30] [--tiny]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAPER = ["anchor.options.preset=160m", "anchor.vocab_size=50432", "index.router.branching=16", "index.router.levels=4",
         "memory.sizes=[256,64,16,0]", "memory.dtype=bfloat16", "memory.io_threads=16"]
TINY = ["anchor.options.preset=tiny", "anchor.options.n_layers=2", "anchor.options.d_model=32",
        "anchor.options.n_heads=2", "anchor.options.head_dim=16", "anchor.options.ffn_dim=64", "anchor.vocab_size=128",
        "index.router.branching=4", "index.router.levels=3", "memory.sizes=[8,4,2]", "memory.dtype=bfloat16"]
# (host read, BLOCK, NUM_WARPS); None = the shipped value
VARIANTS = [("staged", None, None), ("pinned", None, None), ("uva", None, None), ("uva", 16384, 8),
            ("uva", 8192, 8), ("uva", 2048, 4)]


def main(argv: list[str] | None = None) -> int:
    import torch

    from hmlm.bank import uva
    from hmlm.bench.fetch import measure_tiers
    from hmlm.config import load_recipe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--tiny", action="store_true", help="a tiny bank on the CPU (tests)")
    args = ap.parse_args(argv)
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", TINY if args.tiny else PAPER)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shipped = (uva.BLOCK, uva.NUM_WARPS)
    rows = []
    for read, block, warps in VARIANTS:
        uva.BLOCK, uva.NUM_WARPS = block or shipped[0], warps or shipped[1]
        r = replace(recipe, memory=replace(recipe.memory, host_read=read))
        name = f"{read}" + (f"_b{uva.BLOCK}_w{uva.NUM_WARPS}" if read == "uva" else "")
        got = measure_tiers(r, vocab_size=r.anchor.vocab_size, tiers="host", prompts=args.prompts, cache_mb=0.0,
                            device=device, disk_dir=args.out / "disk", profile=args.out / "profile" / name)
        for row in got:
            row.update(variant=name)
            print(f"{name:>22} {row['phase']:>6} fetch p50 {row['fetch_ms']['p50']:7.3f} ms  total p50 "
                  f"{row['total_ms']['p50']:7.3f} ms", flush=True)
        rows += got
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    uva.BLOCK, uva.NUM_WARPS = shipped
    return 0


if __name__ == "__main__":
    sys.exit(main())

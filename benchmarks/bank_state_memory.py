"""Memory the bank's optimizer state takes when only some blocks are ever fetched (a sparse, deep level).

    python benchmarks/bank_state_memory.py [--nodes 256] [--r 16] [--steps 5] [--batch 8]

One level of FFN blocks at the 160M anchor's shape (35 layers, d=512): `nodes` blocks of r units. Each tier runs in its
own process: draw the values, then `steps` lazy-AdamW steps on `batch` random blocks each (a synthetic loss), and
report the process's resident memory growth across the steps. The `device` tier (run on the CPU here, where it is
plain CPU memory) allocates the level's fp32 moments densely on the first update; the `host` tier allocates them with
torch.empty, so only the pages of rows that were ever updated are committed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys


def rss() -> int:
    from hmlm.utils import proc_status_bytes

    return proc_status_bytes("/proc/self/status", "VmRSS") or 0


def child(tier: str, nodes: int, r: int, steps: int, batch: int) -> dict:
    import torch

    from hmlm.bank.layout import BankLayout
    from hmlm.bank.stores import TieredStore
    from hmlm.memories.ffn import FFNMemory
    from hmlm.protocols import AnchorShape

    shape = AnchorShape(n_layers=35, d_model=512, n_heads=12, head_dim=32, ffn_dim=2048)
    branching = int(round(nodes ** 0.5))
    layout = BankLayout(FFNMemory(), shape, (0, r), branching, tuple(range(35)))
    store = TieredStore(layout, tiers=[tier, tier], generic=False, dtype=torch.bfloat16).to_compute("cpu")
    before = rss()
    g = torch.Generator().manual_seed(0)
    touched: set[int] = set()
    for _ in range(steps):
        leaf = torch.randint(0, layout.nodes(1), (batch,), generator=g)
        touched.update(leaf.tolist())
        out = store.fetch(torch.stack([leaf // branching, leaf], 1), grad=True)
        sum(t.float().sum() for t in out.values()).backward()
        store.step(lr=1e-3, weight_decay=0.0)
    store.flush()
    fmt = store.format_of("l1")
    return {"tier": tier, "nodes": layout.nodes(1), "block_params": fmt.numel, "rows_updated": len(touched),
            "dense_state_bytes": layout.nodes(1) * (fmt.m_bytes + fmt.v_bytes),
            "touched_state_bytes": len(touched) * (fmt.m_bytes + fmt.v_bytes),
            "rss_growth_bytes": rss() - before}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.nodes, a.r, a.steps, a.batch)))
        return
    for tier in ("device", "host"):
        out = subprocess.run([sys.executable, __file__, "--child", tier, "--nodes", str(a.nodes), "--r", str(a.r),
                              "--steps", str(a.steps), "--batch", str(a.batch)], capture_output=True, text=True,
                             check=True)
        print(out.stdout.strip())


if __name__ == "__main__":
    main()

"""`hmlm bench generate`: decoding latency per token of a model directory, per memory mode, with and without the
key/value cache (the same prompts, greedy, a fixed number of tokens; EOS is ignored so every row decodes as many)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Sequence

DEFAULT_PROMPTS = ("The atomic number of Hafnium is", "Hafnium was discovered in", "The capital of France is")


def run_generate_bench(model_dir: str | Path, *, modes: Sequence[str], tokens: int = 32,
                       prompts: Sequence[str] = DEFAULT_PROMPTS, repeats: int = 2, device: str | None = None,
                       verify: bool = True, embedder_path: str | Path | None = None) -> list[dict[str, Any]]:
    from ..api import MemoryModel
    from ..generate import Sampling, generate_ids

    m = MemoryModel.load(model_dir, device=device, verify=verify, embedder_path=embedder_path)
    sampling = Sampling(max_new_tokens=tokens)
    rows = []
    for mode in modes:
        for cache in (True, False):
            per_token, fetch_ms = [], []
            for prompt in list(prompts) * repeats:
                got = m.fetch(prompt, mode)
                fetch_ms.append(got.route_ms + got.fetch_ms)
                ids = m.tokenizer.encode(prompt)
                t0 = time.perf_counter()
                n = sum(1 for _ in generate_ids(m.model.anchor, ids, memory=got.memory, sampling=sampling,
                                                use_cache=cache))
                if m.device.type == "cuda":
                    import torch

                    torch.cuda.synchronize(m.device)
                per_token.append(1000 * (time.perf_counter() - t0) / max(1, n))
            rows.append({"memory": mode, "kv_cache": cache, "ms_per_token": round(statistics.median(per_token), 2),
                         "route_fetch_ms": round(statistics.median(fetch_ms), 2), "tokens": tokens,
                         "prompts": len(prompts) * repeats, "device": str(m.device)})
    return rows

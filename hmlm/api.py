"""The Python API of a trained model: `m = hmlm.load(DIR)`, then `m.generate(...)`, `m.stream(...)`,
`m.loglikelihood(...)`, `m.route(...)`.

    m = hmlm.load("runs/quickstart/model")
    m.generate("The atomic number of Hafnium is", max_new_tokens=8, stop=["."])
    for piece in m.stream("Hafnium is", temperature=0.8, top_p=0.9, seed=0): print(piece, end="")
    m.loglikelihood("The atomic number of Hafnium is", " 72")     # (log p, is greedy)
    m.generate("...", memory="blocked:2:5")                        # the paper's knowledge removal

A prompt is routed through the model's tree (the prompt is the retrieval key), its memory is fetched once from
whichever tier holds each level, and decoding runs on the anchor's key/value cache (hmlm.generate). Levels of a host
or disk tier keep the blocks of every level but the deepest in a device-side LRU across prompts (the shallow blocks
most prompts share); device levels are read in place. `loglikelihood` is the lm-eval adapter's scorer (the one NLL
loop), with the same retrieval key.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .generate import Sampling, fit_prompt, generate_ids, sampling_from, stream_text
from .protocols import MemoryContext


@dataclass
class Fetched:
    """What one prompt's routing and fetch gave: the memory, its path (global node id per level, 0-based levels),
    and the time each took."""

    memory: MemoryContext | None
    path: list[int] | None
    route_ms: float
    fetch_ms: float


def cache_shallow_levels(store: Any) -> int:
    """Give a tiered store a device LRU large enough for every block of every host/disk level but the deepest;
    returns its capacity in bytes (0: nothing to cache, every level above the deepest is on the device)."""
    from .bank.stores import _BlockCache

    levels = getattr(store, "levels", None)
    if not levels or not hasattr(store, "cache"):
        return 0
    keys = sorted(k for k in levels if k.startswith("l"))
    shallow = [k for k in keys[:-1] if store.tier_of(k) != "device"]
    if not shallow:
        return 0
    capacity = sum(store.node_counts[k] * store.formats[k].numel * 4 for k in shallow)
    if store.cache is None or store.cache.capacity < capacity:
        store.cache = _BlockCache(capacity)
    store.cache_keys = set(shallow)
    return capacity


class MemoryModel:
    """A loaded model directory for use: generation, scoring and routing under one memory mode (overridable per
    call)."""

    def __init__(self, loaded: Any, memory: str = "fetched"):
        from .eval.adapter import HMLMEvalLM

        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        rc = loaded.recipe.index.router
        self.levels, self.branching = rc.levels, rc.branching
        self.max_length = int(loaded.recipe.data.seq_len)
        # the adapter checks the mode against the model (no bank, no generic block) and holds the scorer
        self._scorers: dict[str, Any] = {}
        self._scorer = lambda mode: self._scorers.setdefault(mode, HMLMEvalLM(loaded=loaded, memory=mode))
        self.memory = memory
        self._scorer(memory)
        self.shallow_cache_bytes = cache_shallow_levels(self.model.store) if self.model.store is not None else 0

    @classmethod
    def load(cls, path: str | Path, *, memory: str = "fetched", device: str | None = None, verify: bool = True,
             embedder_path: str | Path | None = None) -> "MemoryModel":
        from .export import load_model_dir

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(load_model_dir(path, device=dev, verify=verify, embedder_path=embedder_path), memory)

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    # ---- routing and memory --------------------------------------------------------------------

    def fetch(self, text: str, memory: str | None = None) -> Fetched:
        """Route `text` under the memory mode and fetch its blocks (one row)."""
        spec = self._scorer(memory or self.memory).memory
        path, route_ms = None, 0.0
        if spec.needs_routing:
            _ = self.loaded.embedder   # loaded once per model: its start-up is not the route's time
            t0 = time.perf_counter()
            paths = self.loaded.route([text], blocked=spec.blocked)
            route_ms = 1000 * (time.perf_counter() - t0)
            path = paths[0].tolist()
        else:
            paths = torch.zeros(1, self.levels, dtype=torch.long)
        t0 = time.perf_counter()
        ctx = self.model.memory_context(paths.to(self.device), spec.model_mode)
        if ctx is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return Fetched(ctx, path, route_ms, 1000 * (time.perf_counter() - t0))

    def route(self, text: str, memory: str | None = None) -> list[int] | None:
        """The tree path of `text` (global node id per level, level 1 first); None when the mode does not route."""
        spec = self._scorer(memory or self.memory).memory
        return self.loaded.route([text], blocked=spec.blocked)[0].tolist() if spec.needs_routing else None

    # ---- generation ----------------------------------------------------------------------------

    def stream(self, prompt: str, *, memory: str | None = None, fetched: Fetched | None = None,
               use_cache: bool = True, counts: dict[str, int] | None = None, **sampling: Any) -> Iterator[str]:
        """Text pieces of the continuation as they are decoded. Sampling keywords: max_new_tokens (32),
        temperature (0 = greedy), top_p (1.0), seed, stop (strings). `counts["tokens"]` counts decoded tokens."""
        s: Sampling = sampling_from(sampling)
        got = fetched if fetched is not None else self.fetch(prompt, memory)
        ids = fit_prompt(self.tokenizer.encode(prompt), self.max_length, s.max_new_tokens)
        tokens = generate_ids(self.model.anchor, ids, memory=got.memory, sampling=s, eos_id=self.tokenizer.eos_id,
                              use_cache=use_cache)
        if counts is not None:
            tokens = _counted(tokens, counts)
        return stream_text(tokens, lambda t: self.tokenizer.decode(t, skip_special_tokens=True), s.stop)

    def generate(self, prompt: str, *, memory: str | None = None, use_cache: bool = True, **sampling: Any) -> str:
        """The continuation of `prompt` (see `stream`)."""
        return "".join(self.stream(prompt, memory=memory, use_cache=use_cache, **sampling))

    # ---- scoring -------------------------------------------------------------------------------

    def loglikelihood(self, context: str | Sequence[tuple[str, str]], continuation: str | None = None, *,
                      memory: str | None = None) -> tuple[float, bool] | list[tuple[float, bool]]:
        """(sum log p(continuation | context), the continuation is the greedy decode); a list of (context,
        continuation) pairs gives a list. Each pair is routed by its context, as lm-eval requests are."""
        pairs = [(context, continuation)] if isinstance(context, str) else list(context)
        if isinstance(context, str) and continuation is None:
            raise TypeError("loglikelihood(context, continuation): give the continuation to score")
        scores = self._scorer(memory or self.memory).loglikelihood(pairs)
        return scores[0] if isinstance(context, str) else scores


def _counted(tokens: Iterator[int], counts: dict[str, int]) -> Iterator[int]:
    counts.setdefault("tokens", 0)
    for tok in tokens:
        counts["tokens"] += 1
        yield tok


def load(path: str | Path, **kwargs: Any) -> MemoryModel:
    """`hmlm.load(DIR, memory="fetched", device=None, verify=True, embedder_path=None)`: see MemoryModel."""
    return MemoryModel.load(path, **kwargs)


def _unescape(stop: str) -> str:
    """`--stop '\\n'` as typed in a shell is a backslash and an n: the newline is meant."""
    return stop.replace("\\n", "\n").replace("\\t", "\t")


def generate_from_args(args: Any, console: Any, err_console: Any) -> int:
    """`hmlm generate`: each prompt's continuation streamed to stdout (one line per prompt); --show-path and
    --timing go to stderr so that stdout is only the generated text."""
    from rich.markup import escape

    from .inspect import find_model_dir

    model_dir = find_model_dir(args.model)
    sampling = sampling_from({"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                              "top_p": args.top_p, "seed": args.seed, "stop": [_unescape(s) for s in args.stop]})
    m = MemoryModel.load(model_dir, memory=args.memory, device=args.device, verify=not args.no_verify,
                         embedder_path=args.embedder_path)
    for prompt in args.prompts:
        got = m.fetch(prompt)
        if args.show_path:
            show_path(m, model_dir, prompt, got, err_console)
        t0 = time.perf_counter()
        counts: dict[str, int] = {}
        for piece in m.stream(prompt, fetched=got, use_cache=not args.no_cache, counts=counts, **_fields(sampling)):
            console.file.write(piece)
            console.file.flush()
        console.file.write("\n")
        console.file.flush()
        if args.timing:
            ms, n = 1000 * (time.perf_counter() - t0), counts.get("tokens", 0)
            err_console.print(f"decode: {n} tokens in {ms:.0f} ms, {ms / max(1, n):.1f} ms/token (memory="
                              f"{escape(args.memory)}, {'no ' if args.no_cache else ''}KV cache)", highlight=False,
                              soft_wrap=True)
    return 0


def _fields(s: Sampling) -> dict[str, Any]:
    return {k: getattr(s, k) for k in Sampling.__dataclass_fields__}


def show_path(m: MemoryModel, model_dir: Path, prompt: str, got: Fetched, out: Any) -> None:
    """The prompt's tree path with each node's training documents/tokens, the route and fetch time, and the leaf's
    training documents that share most words with the prompt."""
    from rich.markup import escape

    from .knowledge import KnowledgeError, eval_data_of, leaf_documents, node_stats, path_rows

    out.print(f"[bold]memory[/] {escape(m.memory)}: route {got.route_ms:.1f} ms, fetch {got.fetch_ms:.1f} ms"
              + (f" (shallow-level cache {m.shallow_cache_bytes / 2**20:.1f} MiB)" if m.shallow_cache_bytes else ""),
              highlight=False, soft_wrap=True)
    if got.path is None:
        out.print("[bold]path[/] none (this memory mode does not route)", highlight=False)
        return
    data = eval_data_of(model_dir)
    rows = path_rows(node_stats(data, model_dir), got.path)
    parts = [f"{r['level']}:{r['node']}" + (f" ({r['documents']:,} docs, {r['tokens']:,} tokens)"
                                           if "documents" in r else "") for r in rows]
    out.print(f"[bold]path[/] (level:node) {' > '.join(parts)}", highlight=False, soft_wrap=True)
    try:
        docs = leaf_documents(data, got.path, prompt)
    except KnowledgeError as exc:
        out.print(f"[bold]leaf documents[/] unavailable: {escape(str(exc))}", highlight=False, soft_wrap=True)
        return
    for d in docs:
        text = " ".join(d["words"][:40]) + (" ..." if len(d["words"]) > 40 else "")
        out.print(f"[bold]leaf document[/] #{d['doc']} ({d['shared']} shared words): {escape(text)}",
                  highlight=False, soft_wrap=True)

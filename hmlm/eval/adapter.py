"""The lm-eval adapter: `lm_eval.api.model.TemplateLM` over a model directory, registered as model `hmlm`.

Every request is routed through the model's own tree before it is scored, with the retrieval key of the paper
(paper-notes §5.2):

    multiple choice   the question: all choices of a document share one context, and that context is the key
    LM tasks          the context (one request per document)
    schema tasks      the text shared by all choices: the common prefix of the contexts plus the shared continuation
                      (Winograd-style tasks put the choice into the context and score the same continuation)
    rolling ppl       the full document
    generation        the prompt; the memory is fetched once per request and kept for every generated token

Scored requests are batched longest first (little padding); generation batches prompts of one token budget sorted by
length (left-padded where the anchor's cache allows it), and a row leaves its batch once it has hit a stop string.
Requests that share their context tokens and path (the choices of a multiple-choice question) are scored from one
cached forward of that context: with an anchor that offers a key/value cache (`new_cache()`, as openlm and hf do) the
context runs once and only each choice's own tokens run per choice.

Memory modes (model argument `memory`):
    fetched                 the blocks on the request's own path (default)
    generic                 the single context-free generic block
    none                    the anchor alone
    blocked:<level>:<node>  route with that node's subtree masked: descent falls back to the nearest unblocked
                            sibling (the paper's knowledge-removal test). Levels count from 1 as in the paper
                            (level 1 = the k children of the root); node is the level's global id, as in
                            documents.jsonl's `path[level-1]`. Several nodes: blocked:1:3+2:17.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from . import DEFAULT_BATCH_SIZE, EvalError, quiet, templates  # noqa: F401  (DEFAULT_BATCH_SIZE re-exported)
from .lane import torch_threads
from .memory_spec import MemorySpec, parse_memory  # noqa: F401  (re-exported: hmlm.eval.adapter.parse_memory)
from ..export import LoadedModel, load_model_dir
from ..generate import Sampling, autocast_for, fit_prompt, generate_texts
from ..loss import has_fused_head
from ..protocols import MemoryContext

# a batch holds at most this much fetched memory (rows x one row's blocks): the default batch of a paper-sized memory
# would otherwise gather gigabytes per batch (a row of the quickstart's memory is 0.7 MB)
MEMORY_BYTES_PER_BATCH = 1 << 30

quiet.install()       # no "fatal: not a git repository" from lm-eval's simple_evaluate
templates.install()   # lm-eval's prompt templates compiled once, not per document


def _word_prefix(texts: Sequence[str]) -> str:
    prefix = os.path.commonprefix(list(texts))
    if all(len(t) == len(prefix) or t[len(prefix)].isspace() for t in texts) or prefix[-1:].isspace():
        return prefix
    cut = max(prefix.rfind(" "), prefix.rfind("\n"))   # a shared word stem is not shared text
    return prefix[:cut + 1] if cut >= 0 else ""


def retrieval_keys(requests: Sequence[Any]) -> list[str]:
    """The retrieval key of each loglikelihood request. The requests of one document (same task and doc_id) are
    its choices: one shared context -> that context (multiple choice, LM); differing contexts -> the text they
    share (schema). Requests without a doc_id (plain use outside lm-eval) are keyed by their own context."""
    groups: dict[tuple, list[int]] = {}
    for i, req in enumerate(requests):
        doc_id = getattr(req, "doc_id", None)
        key = (getattr(req, "task_name", None), doc_id) if doc_id is not None else ("#", i)
        groups.setdefault(key, []).append(i)
    keys = [""] * len(requests)
    for idx in groups.values():
        contexts = [_args(requests[i])[0] for i in idx]
        conts = [_args(requests[i])[1] for i in idx]
        if len(set(contexts)) == 1:
            key = contexts[0]
        else:
            shared = _word_prefix(contexts).strip()
            tail = conts[0].strip() if len(set(conts)) == 1 else _word_prefix(conts).strip()
            key = f"{shared} {tail}".strip()
        if not key.strip():
            key = contexts[0] + conts[0]   # nothing shared: the whole first request
        for i in idx:
            keys[i] = key
    return keys


def _args(req: Any) -> tuple:
    return req.args if hasattr(req, "args") else tuple(req)


@register_model("hmlm")
class HMLMEvalLM(TemplateLM):
    """lm-eval model `hmlm`: `--model_args path=DIR,memory=fetched[,batch_size=128,device=cpu,max_gen_toks=32]`."""

    def __init__(self, path: str | None = None, memory: str = "fetched", batch_size: int | str | None = None,
                 device: str | None = None, max_gen_toks: int = 32, max_length: int | None = None,
                 verify: bool | str = True, loaded: LoadedModel | None = None, max_batch_size: int | None = None,
                 embed_ahead: Callable[[list[str]], Any] | None = None,
                 batch_threads: Callable[[], int | None] | None = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise EvalError(f"hmlm model_args: unknown argument(s) {', '.join(sorted(unknown))}; known: path, "
                            "memory, batch_size, device, max_gen_toks, max_length, verify")
        if (path is None) == (loaded is None):
            raise EvalError("hmlm model_args: give exactly one of path=<model dir> or loaded=<LoadedModel>")
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes device=cuda by default; a CPU-only machine should still run
            logging.getLogger(__name__).warning("hmlm: CUDA is not available; evaluating on the CPU")
            device = "cpu"
        if loaded is None:
            dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
            loaded = load_model_dir(path, device=dev, verify=str(verify).lower() not in ("false", "0", "no"))
        elif device is not None:
            loaded.to(device)
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer_ = loaded.tokenizer
        rc = loaded.recipe.index.router
        self.memory = parse_memory(memory, levels=rc.levels, branching=rc.branching)
        if self.memory.model_mode != "none" and self.model.store is None:
            raise EvalError(f"memory={memory}: {loaded.path} has no memory bank (trained in anchor mode); "
                            "use memory=none")
        if self.memory.mode == "generic" and not self.model.store.has_generic:
            raise EvalError(f"memory=generic: {loaded.path} was trained without a generic block "
                            "(memory.generic: false)")
        bs = batch_size if batch_size not in (None, "auto") else DEFAULT_BATCH_SIZE
        self.batch_size = int(str(bs).split(":")[0]) if not isinstance(bs, int) else bs
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = int(max_length or loaded.recipe.data.seq_len)
        self._device = loaded.device
        self.levels = rc.levels
        # a mode that routes nothing hands its retrieval keys to this (hmlm eval: embedded on its second thread for
        # the routing modes that follow; lm-eval builds the same requests for every mode)
        self.embed_ahead = embed_ahead
        # asked before each batch: the torch threads to run it on (None: unchanged); hmlm eval answers one while its
        # second thread has work and all of them once it has none (hmlm.eval.lane)
        self.batch_threads = batch_threads
        self._rows_per_batch: int | None = None

    # ---- lm-eval plumbing ------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer_.encode(string)

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return self.tokenizer_.decode(tokens, skip_special_tokens=True)

    @property
    def tokenizer_name(self) -> str:
        return f"hmlm-{self.tokenizer_.kind}-{self.tokenizer_.vocab_size}"

    # ---- routing ---------------------------------------------------------------------------------

    def route_keys(self, keys: Sequence[str]) -> torch.Tensor:
        """Tree paths [N, levels] for retrieval keys under this memory mode (zeros when no routing is needed)."""
        unique = sorted(set(keys))   # LoadedModel.route embeds exactly this list, so embed_ahead passes it too
        if not self.memory.needs_routing:
            if self.embed_ahead is not None and unique:
                self.embed_ahead(unique)
            return torch.zeros(len(keys), self.levels, dtype=torch.long)
        if not unique:
            return torch.zeros(0, self.levels, dtype=torch.long)
        paths = self.loaded.route(unique, blocked=self.memory.blocked)
        where = {k: i for i, k in enumerate(unique)}
        return paths[[where[k] for k in keys]]

    def _autocast(self):
        return autocast_for(self._device)

    @property
    def rows_per_batch(self) -> int:
        """batch_size, or fewer where that many rows of fetched memory would hold more than MEMORY_BYTES_PER_BATCH."""
        if self._rows_per_batch is None:
            rows = self.batch_size
            if self.memory.model_mode == "fetched":   # generic and none have no memory per row
                one = self.model.memory_context(torch.zeros(1, self.levels, dtype=torch.long, device=self._device),
                                                "fetched")
                row_bytes = sum(t.numel() * t.element_size() for t in one.tensors.values()) if one else 0
                rows = max(1, min(rows, MEMORY_BYTES_PER_BATCH // max(row_bytes, 1)))
            self._rows_per_batch = rows
        return self._rows_per_batch

    def _threads(self):
        return torch_threads(self.batch_threads() if self.batch_threads is not None else None)

    def _memory_of(self, paths: torch.Tensor) -> MemoryContext | None:
        """The memory of a batch's rows. Under `generic` every row has the same block: it is fetched once and viewed
        for the other rows (`_repeat_memory`) instead of gathered into a copy per row."""
        if self.memory.model_mode == "generic" and len(paths) > 1:
            return _repeat_memory(self.model.memory_context(paths[:1].to(self._device), "generic"), len(paths))
        return self.model.memory_context(paths.to(self._device), self.memory.model_mode)

    # ---- scoring ---------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        keys = retrieval_keys(requests)
        pairs = []
        for req in requests:
            context, continuation = _args(req)
            if context == "":
                cont = self.tok_encode(continuation)
                pairs.append(([self.prefix_token_id], cont) if cont[:1] != [self.prefix_token_id]
                             else (cont[:1], cont[1:]))
            else:
                pairs.append(self._encode_pair(context, continuation))
        return self.score_tokens(self.route_keys(keys), pairs)

    def _loglikelihood_tokens(self, requests, **kwargs: Any) -> list[tuple[float, bool]]:
        # TemplateLM's entry point when called without Instances: key each request by its context
        keys = [ctx for (ctx, _), _, _ in requests]
        return self.score_tokens(self.route_keys(keys), [(c, t) for _, c, t in requests])

    @torch.no_grad()
    def score_tokens(self, paths: torch.Tensor, pairs: Sequence[tuple[list[int], list[int]]]
                     ) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy decode) per (context, continuation)
        token pair, with the memory on each pair's path."""
        seqs = []
        for ctx, cont in pairs:
            if not cont:
                seqs.append(([], 0))
                continue
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]
            seqs.append((full, min(len(cont), len(full) - 1)))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        live = [i for i in range(len(pairs)) if seqs[i][1] > 0]
        shared, single = self._shared_contexts(seqs, paths, live)
        for prefix, members in shared:
            self._score_from_cache(prefix, paths[members[0]], members, seqs, out)
        # longest first, whatever the path: each row computes its own memory anyway (per-sample weights), while a
        # batch of mixed lengths pays for its padding (the fetched last-word items: 1.4x the time in path order)
        order = sorted(single, key=lambda i: (-len(seqs[i][0]), i))
        pad = self.tokenizer_.pad_id
        for start in range(0, len(order), self.rows_per_batch):
            idx = order[start:start + self.rows_per_batch]
            width = max(len(seqs[i][0]) - 1 for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            for row, i in enumerate(idx):
                inp = seqs[i][0][:-1]
                ids[row, :len(inp)] = torch.tensor(inp)
            with self._threads(), self._autocast():   # the memory is fetched in autocast's dtype, as training was
                memory = self._memory_of(paths[idx])
                states, head = _positions(self.model.anchor, ids.to(self._device), memory=memory)
                for row, i in enumerate(idx):
                    full, n_cont = seqs[i]
                    n = len(full) - 1
                    out[i] = _continuation_score(head(states[row, n - n_cont:n]), full[-n_cont:])
        return out

    def _shared_contexts(self, seqs: list[tuple[list[int], int]], paths: torch.Tensor, live: list[int]
                         ) -> tuple[list[tuple[list[int], list[int]]], set[int]]:
        """([(prefix tokens, requests)], other requests): requests whose inputs before the last context token are
        the same tokens on the same path, grouped when the anchor can cache that prefix and at least two share it."""
        if not callable(getattr(self.model.anchor, "new_cache", None)):
            return [], set(live)
        groups: dict[tuple, list[int]] = {}
        for i in live:
            full, n_cont = seqs[i]
            prefix = tuple(full[:len(full) - 1 - n_cont])
            if prefix:
                groups.setdefault((prefix, tuple(paths[i].tolist())), []).append(i)
        shared = [(list(key[0]), members) for key, members in groups.items() if len(members) > 1]
        taken = {i for _, members in shared for i in members}
        return shared, {i for i in live if i not in taken}

    def _score_from_cache(self, prefix: list[int], path: torch.Tensor, members: list[int],
                          seqs: list[tuple[list[int], int]], out: list[tuple[float, bool]]) -> None:
        """Run the shared prefix once, then each request's last context token and continuation on its cache."""
        anchor = self.model.anchor
        memory = self.model.memory_context(path[None].to(self._device), self.memory.model_mode)
        cache = anchor.new_cache()
        with self._autocast():
            anchor(torch.tensor([prefix], device=self._device), memory=memory, cache=cache)
        pad = self.tokenizer_.pad_id
        for start in range(0, len(members), self.batch_size):
            idx = members[start:start + self.batch_size]
            tails = [seqs[i][0][len(prefix):-1] for i in idx]   # last context token + continuation[:-1]
            ids = torch.full((len(idx), max(map(len, tails))), pad, dtype=torch.long)
            for row, tail in enumerate(tails):
                ids[row, :len(tail)] = torch.tensor(tail)
            with self._threads(), self._autocast():
                states, head = _positions(anchor, ids.to(self._device), memory=_repeat_memory(memory, len(idx)),
                                          cache=cache.repeat(len(idx)))
                for row, i in enumerate(idx):
                    full, n_cont = seqs[i]
                    out[i] = _continuation_score(head(states[row, :n_cont]), full[-n_cont:])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [_args(req)[0] for req in requests]
        paths = self.route_keys(texts)               # the full document is the key
        owners, pairs = [], []
        for i, text in enumerate(texts):
            windows = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(make_disjoint_window, windows):
                owners.append(i)
                pairs.append((ctx, cont))
        scores = self.score_tokens(paths[owners] if owners else paths[:0], pairs)
        totals = [0.0] * len(texts)
        for i, (ll, _) in zip(owners, scores):
            totals[i] += ll
        return totals

    # ---- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (hmlm.generate, on the anchor's key/value cache) with the memory fetched once per request
        from the prompt's path, batched over requests of one token budget."""
        contexts, stops, limits = [], [], []
        for req in requests:
            context, kwargs = _args(req)
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample"):
                raise EvalError("hmlm decodes greedily; set generation_kwargs do_sample: false for this task")
            until = kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            limits.append(int(kwargs.get("max_gen_toks", self.max_gen_toks)))
            contexts.append(context)
        paths = self.route_keys(contexts)
        prompts = [fit_prompt(self.tok_encode(c), self.max_length, n) or [self.prefix_token_id]
                   for c, n in zip(contexts, limits)]
        out = [""] * len(requests)
        # a batch decodes prompts of one token budget, sorted by length: the anchor left-pads a batch's shorter prompts
        # (hmlm.generate.RowDecoder), or decodes each length apart where it cannot
        groups: dict[int, list[int]] = {}
        for i in sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), tuple(paths[i].tolist()), i)):
            groups.setdefault(max(0, limits[i]), []).append(i)
        for limit, members in groups.items():
            for start in range(0, len(members), self.rows_per_batch):
                idx = members[start:start + self.rows_per_batch]
                with self._threads():
                    memory = self._memory_of(paths[idx])
                    texts = generate_texts(self.model.anchor, [prompts[i] for i in idx], memory=memory,
                                           sampling=Sampling(max_new_tokens=limit), decode=self.tok_decode,
                                           stops=[stops[i] for i in idx], eos_id=self.tokenizer_.eos_id)
                for i, text in zip(idx, texts):
                    out[i] = text
        return out


def _positions(anchor: Any, ids: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """(per-position outputs [B, T, ...], head that turns some of them into logits). With an anchor that exposes
    `hidden_states` and `output_weight` (openlm; hmlm.loss fuses the same pair) the outputs are hidden states and
    only the positions that are scored go through the vocabulary-wide head: a context's other positions never
    materialise their logits. Other anchors give logits, and the head is the identity."""
    if has_fused_head(anchor):
        weight = anchor.output_weight()
        return anchor.hidden_states(ids, **kwargs), lambda h: F.linear(h, weight)
    return anchor(ids, **kwargs), lambda x: x


def _continuation_score(logits: torch.Tensor, target: Sequence[int]) -> tuple[float, bool]:
    """(sum of log p(target), every target token is the argmax) from the logits [n, V] that predict `target`."""
    logp = F.log_softmax(logits.float(), dim=-1)
    t = torch.tensor(target, device=logp.device)
    return float(logp.gather(1, t[:, None]).sum()), bool((logp.argmax(-1) == t).all())


def _repeat_memory(memory: MemoryContext | None, n: int) -> MemoryContext | None:
    """A one-row memory context for n rows (views, no copies of the fetched blocks)."""
    if memory is None:
        return None
    rep = copy.copy(memory)
    rep.tensors = {k: t.expand(n, *t.shape[1:]) for k, t in memory.tensors.items()}
    return rep

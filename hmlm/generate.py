"""The decoder: continue a prompt token by token on an anchor's key/value cache, with a memory fetched once.

`generate_ids` is the one decoding loop of hmlm: `hmlm generate`, the Python API (`hmlm.load(DIR).generate`) and
the lm-eval adapter's `generate_until` all call it. The memory (a `MemoryContext` for one row, or None) is fetched
by the caller from the prompt's path and kept for every generated token, as in the paper (the retrieval key is the
prompt; generated text never re-routes).

With an anchor that offers `new_cache()` (openlm, hf) the prompt runs once and each step feeds only the new token;
an anchor without one (a third-party plugin) recomputes the whole sequence per step. Both give the same tokens
(tests/test_generate.py). `generate_rows` decodes several prompts of one length together (lm-eval's generation
tasks, `generate_texts`): rows of different lengths would need left padding and an attention mask that the anchors'
cache contract does not have, so callers group prompts by length.

Sampling (`Sampling`): greedy when temperature is 0, otherwise softmax(logits / temperature) restricted to the
smallest set of tokens whose probability reaches top_p, drawn from a generator seeded with `seed` (same seed, same
text). `stream_text` turns the tokens into text pieces, ending at the first stop string (which is not returned).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .loss import has_fused_head
from .protocols import MemoryContext


class GenerateError(ValueError):
    """A user error in a generation request (bad sampling value, empty prompt)."""


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 32
    temperature: float = 0.0        # 0: greedy
    top_p: float = 1.0              # nucleus: keep the most likely tokens up to this much probability
    seed: int | None = None         # sampling generator seed (None: torch's global generator)
    stop: tuple[str, ...] = field(default=())   # the text ends before the first of these

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise GenerateError(f"max_new_tokens={self.max_new_tokens}: must be >= 0")
        if self.temperature < 0:
            raise GenerateError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise GenerateError(f"top_p={self.top_p}: must be in (0, 1]")


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (as training ran), exact fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token id from one position's logits [V]."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        # keep a token while the mass before it is below top_p: the most likely token always stays
        keep = (sorted_p.cumsum(0) - sorted_p) < sampling.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def has_cache(anchor: nn.Module) -> bool:
    return callable(getattr(anchor, "new_cache", None))


def last_logits(anchor: nn.Module, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The logits [B, V] of each row's last position. With an anchor that exposes `hidden_states` and
    `output_weight` (openlm; hmlm.loss fuses the same pair) only that position goes through the vocabulary-wide head:
    a prompt's other positions never do (half the head's work in lm-eval's short generations)."""
    if has_fused_head(anchor):
        return F.linear(anchor.hidden_states(ids, **kwargs)[:, -1], anchor.output_weight())
    return anchor(ids, **kwargs)[:, -1]


def pads_prompts(anchor: nn.Module) -> bool:
    """Whether the anchor's cache takes `doc_ids` (padding = -1), so that prompts of different lengths share a batch."""
    return has_cache(anchor) and bool(getattr(anchor, "cache_doc_ids", False))


class RowDecoder:
    """Decoding several prompts at once: `step()` gives the next token of every live row, `drop(rows)` takes rows
    that need no more tokens out of the batch (their cache rows and memory rows go, so later steps cost only the live
    rows; rows are dropped once a quarter of the batch has finished, since each drop copies the caches).

    Prompts of different lengths are left-padded where the anchor's cache takes document ids (`pads_prompts`): the
    padding has document id -1, so no row attends to it and each row gets the positions it would have alone. Other
    anchors need prompts of one length. Rows never interact, so a row's greedy tokens are the ones it gets alone, up
    to the float rounding of a batched matmul. Sampled rows draw from one generator in row order: a seed reproduces
    the whole batch, not each row alone. Row numbers are the prompts' indices throughout."""

    def __init__(self, anchor: nn.Module, prompts: Sequence[Sequence[int]], *, memory: MemoryContext | None,
                 sampling: Sampling, use_cache: bool = True):
        if not prompts:
            raise ValueError("RowDecoder needs at least one prompt")
        if any(not p for p in prompts):
            raise GenerateError("the prompt has no tokens; give some text (or a BOS/prefix token)")
        self.anchor, self.sampling = anchor, sampling
        self.cache = anchor.new_cache() if use_cache and has_cache(anchor) else None
        width = max(len(p) for p in prompts)
        ragged = any(len(p) != width for p in prompts)
        if ragged and (self.cache is None or not pads_prompts(anchor)):
            raise ValueError("RowDecoder needs prompts of one length for this anchor (group them by length)")
        self.device = next(anchor.parameters()).device
        self.generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        self.memory = memory
        self.n_rows = len(prompts)
        self.rows = list(range(len(prompts)))            # rows in the batch, in batch order
        self._finished: set[int] = set()
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        self.ids = ids.to(self.device)                   # every token so far (the uncached loop feeds them all)
        self.doc_ids: torch.Tensor | None = None
        if ragged:
            lengths = torch.tensor([len(p) for p in prompts])
            self.doc_ids = (torch.arange(width)[None, :] >= width - lengths[:, None]).long().sub(1).clamp_max(0)
            self.doc_ids = self.doc_ids.to(self.device)  # -1 on the padding, 0 on the prompt
        self.feed = self.ids
        self.steps = 0

    def step(self) -> list[int]:
        """The next token of each row in the batch (`self.rows` order, which only `drop` changes)."""
        with autocast_for(self.device):
            if self.cache is not None:
                doc_ids = self.doc_ids if self.steps == 0 else None   # later tokens continue each row's prompt
                last = last_logits(self.anchor, self.feed, memory=self.memory, cache=self.cache,
                                   **({"doc_ids": doc_ids} if doc_ids is not None else {}))
            else:
                last = last_logits(self.anchor, self.feed, memory=self.memory)
        if self.sampling.temperature == 0:
            step = last.argmax(-1)
        else:
            step = torch.tensor([next_token(row, self.sampling, self.generator) for row in last], device=self.device)
        self.ids = torch.cat([self.ids, step[:, None]], dim=1)
        self.feed = step[:, None] if self.cache is not None else self.ids
        self.steps += 1
        return step.tolist()

    def drop(self, rows: Iterable[int]) -> None:
        """These rows need no more tokens; once a quarter of the batch has finished, they leave it."""
        self._finished.update(rows)
        self._compact()

    def finished(self, row: int) -> bool:
        return row in self._finished

    @property
    def done(self) -> bool:
        """Every row has finished."""
        return len(self._finished) == self.n_rows

    def _compact(self) -> None:
        done = sum(row in self._finished for row in self.rows)
        if not done or done * 4 < len(self.rows):
            return
        if self.cache is not None and not callable(getattr(self.cache, "select", None)):
            return   # a cache that cannot drop rows: finished rows are decoded on and ignored
        keep = [i for i, row in enumerate(self.rows) if row not in self._finished]
        self.rows = [self.rows[i] for i in keep]
        if not keep:   # every row has finished: the caller stops (a step now would be of no rows)
            return
        index = torch.tensor(keep, device=self.device)
        self.ids, self.feed = self.ids.index_select(0, index), self.feed.index_select(0, index)
        if self.doc_ids is not None:
            self.doc_ids = self.doc_ids.index_select(0, index)
        if self.cache is not None:
            self.cache = self.cache.select(index)
        if self.memory is not None:
            self.memory = select_memory_rows(self.memory, index)


def select_memory_rows(memory: MemoryContext, rows: torch.Tensor) -> MemoryContext:
    """The memory of some rows of a batch. A memory whose tensors all hold one row for every row (broadcast, as the
    generic block is: eval's `_repeat_memory`) serves any number of rows as it is."""
    if all(t.shape[0] == 1 or t.stride(0) == 0 for t in memory.tensors.values()):
        return memory
    out = copy.copy(memory)
    out.tensors = {k: t.index_select(0, rows.to(t.device)) for k, t in memory.tensors.items()}
    out.slots = {name: t.unbind(1) for name, t in out.tensors.items()}
    return out


@torch.no_grad()
def generate_rows(anchor: nn.Module, prompts: Sequence[Sequence[int]], *, memory: MemoryContext | None,
                  sampling: Sampling, use_cache: bool = True) -> Iterator[list[int]]:
    """Per step, the next token id of every row (`RowDecoder`, no row dropped), for at most
    `sampling.max_new_tokens` steps; the caller stops iterating once it has what it needs."""
    decoder = RowDecoder(anchor, prompts, memory=memory, sampling=sampling, use_cache=use_cache)
    for _ in range(sampling.max_new_tokens):
        yield decoder.step()


def generate_ids(anchor: nn.Module, prompt: Sequence[int], *, memory: MemoryContext | None, sampling: Sampling,
                 eos_id: int | None = None, use_cache: bool = True) -> Iterator[int]:
    """Yield up to `sampling.max_new_tokens` token ids continuing `prompt`; ends early at `eos_id` (not yielded)."""
    if not prompt:
        raise GenerateError("the prompt has no tokens; give some text (or a BOS/prefix token)")
    for (tok,) in generate_rows(anchor, [prompt], memory=memory, sampling=sampling, use_cache=use_cache):
        if tok == eos_id:
            return
        yield tok


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still become a stop string (or complete a multi-byte character)."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


def stream_text(tokens: Iterable[int], decode: Callable[[list[int]], str], stop: Sequence[str] = ()
                ) -> Iterator[str]:
    """Text pieces of the decoded tokens, as soon as they cannot be part of a stop string; ends at the first stop
    string (excluded). Decoding the whole list each time keeps multi-token characters and merged spaces right."""
    stops = [s for s in stop if s]
    out: list[int] = []
    sent = 0
    text = ""
    for tok in tokens:
        out.append(tok)
        text = decode(out)
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            cut = min(hits)
            if cut > sent:
                yield text[sent:cut]
            return
        safe = len(text) - _held_back(text, stops)
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    if len(text) > sent:
        yield text[sent:]


def generate_text(anchor: nn.Module, prompt: Sequence[int], *, memory: MemoryContext | None, sampling: Sampling,
                  decode: Callable[[list[int]], str], eos_id: int | None = None, use_cache: bool = True) -> str:
    """The whole continuation as text (see `stream_text`)."""
    tokens = generate_ids(anchor, prompt, memory=memory, sampling=sampling, eos_id=eos_id, use_cache=use_cache)
    return "".join(stream_text(tokens, decode, sampling.stop))


def generate_texts(anchor: nn.Module, prompts: Sequence[Sequence[int]], *, memory: MemoryContext | None,
                   sampling: Sampling, decode: Callable[[list[int]], str], stops: Sequence[Sequence[str]],
                   eos_id: int | None = None, use_cache: bool = True) -> list[str]:
    """`generate_text` for several prompts in one batch (one forward per step for all live rows; see `RowDecoder`),
    each row with its own stop strings. A row leaves the batch when it hits its end of sequence or a stop string;
    decoding ends when every row has, or after `sampling.max_new_tokens`. Prompts of different lengths share the
    batch where the anchor pads them (`pads_prompts`); otherwise each length is a batch of its own."""
    if not prompts:
        return []
    if len({len(p) for p in prompts}) > 1 and not (use_cache and pads_prompts(anchor)):
        out = [""] * len(prompts)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(len(p), []).append(i)
        for idx in groups.values():
            rows = torch.tensor(idx)
            texts = generate_texts(anchor, [prompts[i] for i in idx], memory=None if memory is None else
                                   select_memory_rows(memory, rows), sampling=sampling, decode=decode,
                                   stops=[stops[i] for i in idx], eos_id=eos_id, use_cache=use_cache)
            for i, text in zip(idx, texts):
                out[i] = text
        return out
    tokens: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        decoder = RowDecoder(anchor, prompts, memory=memory, sampling=sampling, use_cache=use_cache)
        for _ in range(sampling.max_new_tokens):
            finished = []
            for row, tok in zip(decoder.rows, decoder.step()):
                if decoder.finished(row):   # finished, still in the batch until the next compaction
                    continue
                if tok == eos_id:
                    finished.append(row)
                    continue
                tokens[row].append(tok)
                if any(s and s in decode(tokens[row]) for s in stops[row]):
                    finished.append(row)
            decoder.drop(finished)
            if decoder.done:
                break
    return ["".join(stream_text(t, decode, stop)) for t, stop in zip(tokens, stops)]


def fit_prompt(prompt: list[int], max_length: int, max_new_tokens: int) -> list[int]:
    """The prompt's last tokens that leave room for the continuation within the model's trained context."""
    return prompt[-max(1, max_length - max_new_tokens):]


def sampling_from(kwargs: dict[str, Any], **defaults: Any) -> Sampling:
    """A Sampling from keyword arguments, unknown keys refused by name."""
    known = set(Sampling.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise GenerateError(f"unknown generation argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    merged = {**defaults, **kwargs}
    if isinstance(merged.get("stop"), str):
        merged["stop"] = (merged["stop"],)
    merged["stop"] = tuple(merged.get("stop") or ())
    return Sampling(**merged)

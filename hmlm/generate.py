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
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

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


@torch.no_grad()
def generate_rows(anchor: nn.Module, prompts: Sequence[Sequence[int]], *, memory: MemoryContext | None,
                  sampling: Sampling, use_cache: bool = True) -> Iterator[list[int]]:
    """The decoding loop: per step, the next token id of every row, for prompts of one length with `memory` holding
    one row per prompt (or None); at most `sampling.max_new_tokens` steps, and the caller stops iterating once it has
    what it needs. Rows never interact (no padding is needed, so no attention mask), so a row's greedy tokens are
    the ones it gets alone, up to the float rounding of a batched matmul. Sampled rows draw from one generator in
    row order: a seed reproduces the whole batch, not each row alone."""
    if not prompts or any(len(p) != len(prompts[0]) for p in prompts):
        raise ValueError("generate_rows needs prompts of one length (group them by length)")
    if not prompts[0]:
        raise GenerateError("the prompt has no tokens; give some text (or a BOS/prefix token)")
    device = next(anchor.parameters()).device
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    cache = anchor.new_cache() if use_cache and has_cache(anchor) else None
    ids = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=device)
    feed = ids
    for _ in range(sampling.max_new_tokens):
        with autocast_for(device):
            logits = anchor(feed, memory=memory, cache=cache) if cache is not None else anchor(feed, memory=memory)
        last = logits[:, -1]
        if sampling.temperature == 0:
            step = last.argmax(-1)
        else:
            step = torch.tensor([next_token(row, sampling, generator) for row in last], device=device)
        yield step.tolist()
        ids = torch.cat([ids, step[:, None]], dim=1)
        feed = step[:, None] if cache is not None else ids


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
    """`generate_text` for several prompts of one length in one batch (one forward per step for all rows; see
    `generate_rows`), each row with its own stop strings; decoding ends when every row has hit its end of
    sequence, a stop string or `sampling.max_new_tokens`."""
    tokens: list[list[int]] = [[] for _ in prompts]
    live = set(range(len(prompts)))
    for step in generate_rows(anchor, prompts, memory=memory, sampling=sampling, use_cache=use_cache):
        for row in sorted(live):
            if step[row] == eos_id:
                live.discard(row)
                continue
            tokens[row].append(step[row])
            if any(s and s in decode(tokens[row]) for s in stops[row]):
                live.discard(row)
        if not live:
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

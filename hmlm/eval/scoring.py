"""How a greedy generation is scored against a fact's answers (the fact tasks' lm-eval `process_results`).

    integer   the first integer in the generation equals the answer (the paper's atomic-number rule)
    symbol    the first word, punctuation stripped, equals the answer exactly (case matters: Co is not CO)
    name      the generation starts with the answer or one of its aliases, case-insensitively, ending at a
              word boundary ("Paris, the capital" counts; "Parisian" does not)
"""
from __future__ import annotations

import re
import unicodedata
from typing import Sequence

_INT = re.compile(r"-?\d+")
_WORD = re.compile(r"[^\W\d_]+")


def _fold(text: str) -> str:
    # accents are folded too, so "Bogota" matches an answer spelled "Bogotá"
    text = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in text if not unicodedata.combining(c))


def first_integer(text: str) -> int | None:
    m = _INT.search(text)
    return int(m.group()) if m else None


def is_correct(kind: str, generation: str, answers: Sequence[str]) -> bool:
    if kind == "integer":
        value = first_integer(generation)
        return value is not None and any(value == int(a) for a in answers)
    if kind == "symbol":
        m = _WORD.search(generation)
        return m is not None and m.group() in answers
    if kind == "name":
        text = _fold(generation.strip())
        for answer in answers:
            a = _fold(answer.strip())
            if a and text.startswith(a) and (len(text) == len(a) or not text[len(a)].isalnum()):
                return True
        return False
    raise ValueError(f"unknown answer kind {kind!r}; expected integer, symbol or name")


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval hook: `results` holds the (filtered) generation for `doc`."""
    return {"acc": float(is_correct(doc["kind"], results[0], doc["answers"]))}

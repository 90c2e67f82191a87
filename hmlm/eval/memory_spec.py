"""The `memory` argument shared by `hmlm eval`, `hmlm generate`, the lm-eval adapter and the Python API.

    fetched                 the blocks on the text's own path (default)
    generic                 the single context-free generic block
    none                    the anchor alone
    blocked:<level>:<node>  route with that node's subtree masked: descent falls back to the nearest unblocked
                            sibling (the paper's knowledge-removal test). Several nodes: blocked:1:3+2:17.

Level convention: on the command line and in `memory=` strings levels count from 1 as in the paper (level 1 = the k
children of the root) and `node` is the level's global id, as in documents.jsonl's `path[level-1]` and in `hmlm
generate --show-path`. The router (`Router.route(blocked=...)`) and `MemorySpec.blocked` hold 0-based levels; the
conversion happens here and only here. Kept free of lm-eval so that `hmlm generate` does not import it.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import EvalError


@dataclass(frozen=True)
class MemorySpec:
    """A parsed `memory` argument. `blocked` holds (level, node) pairs with 0-based levels (the router's)."""

    mode: str                                   # fetched | generic | none | blocked
    blocked: tuple[tuple[int, int], ...] = ()

    @property
    def model_mode(self) -> str:
        return "fetched" if self.mode == "blocked" else self.mode

    @property
    def needs_routing(self) -> bool:
        return self.model_mode == "fetched"


def parse_memory(spec: str | None, *, levels: int, branching: int) -> MemorySpec:
    # lm-eval's model_args parser turns the string "none" into None
    spec = "none" if spec is None else str(spec).strip()
    if spec in ("fetched", "generic", "none"):
        return MemorySpec(spec)
    if not spec.startswith("blocked:"):
        raise EvalError(f"memory={spec!r}: expected fetched, generic, none or blocked:<level>:<node>")
    pairs = []
    for part in spec[len("blocked:"):].split("+"):
        try:
            level, node = (int(v) for v in part.split(":"))
        except ValueError:
            raise EvalError(f"memory={spec!r}: each blocked node is <level>:<node> with integers, "
                            f"got {part!r}") from None
        if not 1 <= level <= levels:
            raise EvalError(f"memory={spec!r}: level {level} is outside the tree (levels are 1..{levels})")
        if not 0 <= node < branching ** level:
            raise EvalError(f"memory={spec!r}: level {level} has nodes 0..{branching ** level - 1}, got {node}")
        pairs.append((level - 1, node))
    return MemorySpec("blocked", tuple(pairs))

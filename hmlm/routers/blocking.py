"""The `blocked` argument of Router.route, parsed once for every router (built-in or plugin)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def blocked_masks(blocked: Sequence[tuple[int, int]], branching: int, levels: int, who: str) -> dict[int, np.ndarray]:
    """{0-based level: bool mask over that level's k**(level+1) nodes} of the blocked nodes; ValueError (prefixed with
    `who`, e.g. "hkmeans.route") for an entry that is not a (level, node) pair or lies outside the tree."""
    masks: dict[int, np.ndarray] = {}
    for item in blocked:
        try:
            lv, node = (int(v) for v in item)
        except (TypeError, ValueError):
            raise ValueError(f"{who}: blocked entries must be (level, node) pairs, got {item!r}") from None
        size = branching ** (lv + 1)
        if not 0 <= lv < levels or not 0 <= node < size:
            raise ValueError(f"{who}: blocked ({lv}, {node}) is outside the tree: levels are "
                             f"0..{levels - 1} and level {lv} has nodes 0..{size - 1}")
        masks.setdefault(lv, np.zeros(size, dtype=bool))[node] = True
    return masks

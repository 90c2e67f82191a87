"""The shape of a memory bank: which levels hold memory, how big each block is, how many parameters in total.

fetched = Σ_l |block(r_l)|, bank = Σ_l k^l · |block(r_l)| (levels numbered from 1), exactly the paper's accounting;
for FFN memories |block(r)| = 3·r·L·d.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

from ..protocols import AnchorShape, MemoryType, TensorSpec


@dataclass(frozen=True)
class BankLayout:
    memory: MemoryType
    shape: AnchorShape
    sizes: tuple[int, ...]          # r_l per level (0 = no memory at that level)
    branching: int
    layers: tuple[int, ...]         # anchor layers that carry memory

    @property
    def active_levels(self) -> list[int]:
        """0-based levels with r_l > 0."""
        return [lvl for lvl, r in enumerate(self.sizes) if r > 0]

    @property
    def total_rank(self) -> int:
        return sum(self.sizes)

    def nodes(self, level: int) -> int:
        return self.branching ** (level + 1)

    def spec(self, r: int) -> dict[str, TensorSpec]:
        return self.memory.block_spec(self.shape, r, len(self.layers))

    def block_params(self, r: int) -> int:
        return sum(prod(s.shape) for s in self.spec(r).values()) if r > 0 else 0

    def fetched_params(self) -> int:
        return sum(self.block_params(r) for r in self.sizes)

    def level_params(self, level: int) -> int:
        return self.nodes(level) * self.block_params(self.sizes[level])

    def bank_params(self) -> int:
        return sum(self.level_params(lvl) for lvl in range(len(self.sizes)))

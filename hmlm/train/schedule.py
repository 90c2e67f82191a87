"""Learning-rate schedule: linear warmup to the peak, then cosine decay to the floor (paper App. A)."""
from __future__ import annotations

import math

from ..config import OptimConfig


def cosine_lr(step: int, cfg: OptimConfig, max_steps: int) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))

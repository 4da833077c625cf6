"""Learning-rate schedules: linear warmup, then cosine decay or constant."""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, *, warmup: int, total: int, schedule: str = "cosine",
          min_ratio: float = 0.1) -> float:
    """LR for optimizer step ``step`` (0-based).

    Warmup ramps linearly from base_lr/warmup to base_lr over ``warmup`` steps; cosine then decays
    to ``min_ratio × base_lr`` at ``total`` and stays there (training past ``total`` — after
    ``steps`` was raised — keeps the floor rather than restarting the cycle).
    """
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = base_lr * min_ratio
    return floor + 0.5 * (base_lr - floor) * (1.0 + math.cos(math.pi * progress))


"""The learning-rate schedule of both trainers: linear warm-up to 1, then cosine down to a floor."""
from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float) -> Callable[[int], float]:
    """LR factor of optimiser step ``step`` (for ``torch.optim.lr_scheduler.LambdaLR``): ``(step + 1) /
    warmup_steps`` during warm-up, then ``floor + (1 - floor) * (1 + cos(pi * progress)) / 2`` with progress
    going 0 -> 1 from the end of warm-up to ``total_steps`` (and staying at ``floor`` after)."""
    if warmup_steps < 0 or total_steps < 1 or not 0.0 <= floor <= 1.0:
        raise ValueError(f"warmup_cosine: expected warmup_steps >= 0, total_steps >= 1, 0 <= floor <= 1, got "
                         f"{warmup_steps}, {total_steps}, {floor}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor

"""Learning-rate schedules, evaluated per step from Python (``Optimizer.set_learning_rate``)."""

from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


def warmup_cosine(step: int, steps: int, lr: float, warmup_steps: int = 0, final_lr: float = 0.0) -> float:
    """Linear warm-up from ``lr/warmup_steps`` to ``lr`` over ``warmup_steps``, then cosine to ``final_lr``.

    ``step`` counts from 0; the last step (``steps - 1``) reaches ``final_lr`` only when there is no
    warm-up step left to take, so a 1-step run trains at ``lr``.
    """
    if steps <= 0:
        return lr
    warmup_steps = max(0, min(warmup_steps, steps - 1))
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    span = steps - warmup_steps
    if span <= 1:
        return lr
    progress = (step - warmup_steps) / span
    return final_lr + 0.5 * (lr - final_lr) * (1.0 + math.cos(math.pi * progress))

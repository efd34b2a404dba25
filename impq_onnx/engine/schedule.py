"""Learning-rate schedules, evaluated per step from Python (``Optimizer.set_learning_rate``)."""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "learning_rate", "warmup_cosine", "warmup_exponential"]

SCHEDULES = ("cosine", "exponential")


def _warmup(step: int, steps: int, lr: float, warmup_steps: int) -> tuple[float | None, int, int]:
    """(the warm-up rate at ``step``, or None after the warm-up; steps since the warm-up; steps after it)."""
    warmup_steps = max(0, min(warmup_steps, steps - 1))
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1), 0, 0
    return None, step - warmup_steps, steps - warmup_steps


def warmup_cosine(step: int, steps: int, lr: float, warmup_steps: int = 0, final_lr: float = 0.0) -> float:
    """Linear warm-up from ``lr/warmup_steps`` to ``lr`` over ``warmup_steps``, then cosine to ``final_lr``.

    ``step`` counts from 0; the last step (``steps - 1``) reaches ``final_lr`` only when there is no
    warm-up step left to take, so a 1-step run trains at ``lr``.
    """
    if steps <= 0:
        return lr
    warm, done, span = _warmup(step, steps, lr, warmup_steps)
    if warm is not None:
        return warm
    if span <= 1:
        return lr
    return final_lr + 0.5 * (lr - final_lr) * (1.0 + math.cos(math.pi * done / span))


def warmup_exponential(step: int, steps: int, lr: float, warmup_steps: int = 0, final_lr: float = 0.0) -> float:
    """Linear warm-up as :func:`warmup_cosine`, then exponential decay from ``lr`` to ``final_lr``.

    After the warm-up, step ``k`` of the ``span`` remaining steps trains at ``lr * (final_lr/lr)^(k/span)``
    (FAQ's schedule: a constant factor per step). ``final_lr`` must be positive (an exponential never
    reaches 0); the rate reached one step past the end is ``final_lr``, so consecutive runs whose
    ``lr``/``final_lr`` meet follow one unbroken exponential curve.
    """
    if final_lr <= 0.0 or lr <= 0.0:
        raise ValueError(f"an exponential schedule needs positive rates, got lr={lr}, final_lr={final_lr}")
    if steps <= 0:
        return lr
    warm, done, span = _warmup(step, steps, lr, warmup_steps)
    return warm if warm is not None else lr * (final_lr / lr) ** (done / span)


def learning_rate(schedule: str, step: int, steps: int, lr: float, warmup_steps: int = 0,
                  final_lr: float = 0.0) -> float:
    """The rate of ``schedule`` (one of :data:`SCHEDULES`) at ``step``."""
    if schedule == "cosine":
        return warmup_cosine(step, steps, lr, warmup_steps, final_lr)
    if schedule == "exponential":
        return warmup_exponential(step, steps, lr, warmup_steps, final_lr)
    raise ValueError(f"learning-rate schedule {schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")

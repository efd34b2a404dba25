"""Runner-up classes, margins and the seed vectors that turn one backward pass into margin gradients.

For sample ``n`` with logits ``Z`` and prediction ``Yhat = argmax Z`` the runner-up set ``S`` is the
``R`` classes other than ``Yhat`` with the smallest ``|Z_i - Z_Yhat|`` (ties in that order broken by
class index). A margin counts as a *tie* when ``|Z_i - Z_Yhat|`` is below the float32 resolution of
the two logits (``TIE_RELATIVE * max(|Z_i|, |Z_Yhat|)``, exact equality included): the term
``1/|margin|^2`` is then rounding noise (the reference code divided by zero there and poisoned a
layer with NaN), so the pair gets weight 0 and is skipped.

The seed of pair ``(n, i)`` is ``(e_i - e_Yhat) / |Z_i - Z_Yhat|``: the gradient of ``seed . Z``
is ``d(Z_i - Z_Yhat)/d(.) / |margin|``, whose square is the paper's summand without the 1/24.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["TIE_RELATIVE", "RunnerUps", "runner_ups", "rank_seeds", "probe_seeds"]

TIE_RELATIVE = float(np.finfo(np.float32).eps)


@dataclasses.dataclass(frozen=True)
class RunnerUps:
    """Per sample: the prediction, the runner-up classes and ``1/|margin|`` (0 for a tie)."""

    predicted: np.ndarray  # [N] int
    classes: np.ndarray  # [N, R] int, closest runner-up first
    inverse_margin: np.ndarray  # [N, R] float64, 0 where the pair is a tie
    num_classes: int

    @property
    def ties(self) -> int:
        return int(np.count_nonzero(self.inverse_margin == 0))


def runner_ups(logits: np.ndarray, count: int) -> RunnerUps:
    """Pick the ``count`` runner-ups of every row of ``logits`` (capped at classes - 1)."""
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be [samples, classes >= 2], got shape {z.shape}")
    n, c = z.shape
    r = max(1, min(int(count), c - 1))
    predicted = np.argmax(z, axis=1)
    top = z[np.arange(n), predicted]
    gap = top[:, None] - z  # >= 0
    gap[np.arange(n), predicted] = np.inf
    classes = np.argsort(gap, axis=1, kind="stable")[:, :r]
    margin = np.take_along_axis(gap, classes, axis=1)
    scale = np.maximum(np.abs(top)[:, None], np.abs(np.take_along_axis(z, classes, axis=1)))
    tie = ~np.isfinite(margin) | (margin <= TIE_RELATIVE * scale)
    inverse = np.where(tie, 0.0, 1.0 / np.where(tie, 1.0, margin))
    return RunnerUps(predicted, classes, inverse, c)


def rank_seeds(ups: RunnerUps, rank: int) -> np.ndarray:
    """``[N, classes]`` seeds for the ``rank``-th runner-up of every sample."""
    n = len(ups.predicted)
    seed = np.zeros((n, ups.num_classes), np.float64)
    rows = np.arange(n)
    w = ups.inverse_margin[:, rank]
    seed[rows, ups.classes[:, rank]] += w
    seed[rows, ups.predicted] -= w
    return seed.astype(np.float32)


def probe_seeds(ups: RunnerUps, rng: np.random.Generator) -> np.ndarray:
    """One Rademacher probe: ``sum_r eps_r * seed_r`` with independent random signs ``eps``.

    For any linear map ``g`` of the seed, ``E|g(probe)|^2 = sum_r |g(seed_r)|^2``: the cross terms
    have zero mean because the signs are independent.
    """
    n, r = ups.classes.shape
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n, r))
    w = signs * ups.inverse_margin
    seed = np.zeros((n, ups.num_classes), np.float64)
    rows = np.repeat(np.arange(n), r)
    np.add.at(seed, (rows, ups.classes.reshape(-1)), w.reshape(-1))
    seed[np.arange(n), ups.predicted] -= w.sum(axis=1)
    return seed.astype(np.float32)

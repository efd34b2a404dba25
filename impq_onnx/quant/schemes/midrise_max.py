"""``midrise-max`` (the reference code): per kernel ``k`` with bits ``B``::

    step = max|w_k| * 2^(1-B)                       # = 2 max|w_k| / 2^B
    r    = clip(rint(w / step - 0.5), -2^(B-1), 2^(B-1) - 1)
    q    = (r + 0.5) * step                        # levels ±step/2 ... ±(2^B-1) step/2, no zero

1 bit: ``{±max/2}``; 2 bits: ``{±max/4, ±3max/4}``. Lowered as the odd integers ``c = 2r + 1`` in
``[-(2^B - 1), 2^B - 1]`` at scale ``step / 2`` (an 8-bit kernel needs 9-bit codes).
"""

from __future__ import annotations

import numpy as np

from impq_onnx.quant.quantizers import GraphBuilder
from impq_onnx.quant.schemes.base import Grid, WeightScheme

__all__ = ["MidriseMax"]


class MidriseMax(WeightScheme):
    name = "midrise-max"
    summary = "reference code"
    exact_statistic = True  # a maximum does not depend on the order of evaluation

    def grid(self, bits: int) -> Grid:
        return Grid(2.0 ** (1 - bits), 0.5, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)

    def statistic(self, w: np.ndarray, axis: int) -> np.ndarray:
        axes = tuple(i for i in range(w.ndim) if i != axis)
        return np.max(np.abs(w), axis=axes, keepdims=True)

    def build_statistic(self, g: GraphBuilder, weight: str, rank: int, axis: int) -> str:
        return g.reduce("ReduceMax", g.op("Abs", [weight]), [i for i in range(rank) if i != axis])

    def sensitivity_steps(self, w: np.ndarray, axis: int, bits: list[int]) -> np.ndarray:
        # float64 as the sensitivity weighting has always computed it (equal to the float32 step but for
        # an all-zero kernel, whose step here is 0 rather than the quantizer's 1e-30 floor)
        w = np.asarray(w, np.float64)
        stat = np.max(np.abs(w), axis=tuple(a for a in range(w.ndim) if a != axis))
        return stat * np.array([self.grid(b).factor for b in bits])

"""``symmetric-rms`` (the paper text: clip at ``d = 4 RMS(w_k)``, zero level), per kernel ``k`` with bits ``B``::

    B >= 2: step = d / (2^(B-1) - 1);  r = clip(rint(w / step), -(2^(B-1)-1), 2^(B-1)-1);  q = r * step
            (2^B - 1 levels, symmetric, 0 included, ±d the extreme levels)
    B == 1: step = d / 2;  r = clip(rint(w / step - 0.5), -1, 0);  q = (r + 0.5) * step
            (= sign(w) * RMS(w_k): a zero-free 1-bit grid; ±d would be far too coarse)

``RMS`` is a float32 mean (``Mul``, ``ReduceMean``, ``Sqrt``); numpy and onnxruntime sum in different
orders, so lowering takes it from onnxruntime. Lowered as ``c = r`` at scale ``step`` (``B >= 2``) or
``c`` in ``{-1, +1}`` at scale ``step / 2`` (``B == 1``).
"""

from __future__ import annotations

import numpy as np

from impq_onnx.quant.quantizers import GraphBuilder
from impq_onnx.quant.schemes.base import Grid, WeightScheme

__all__ = ["SymmetricRms", "RMS_RANGE"]

RMS_RANGE = 4.0  # the clip in RMS units (paper text)


class SymmetricRms(WeightScheme):
    name = "symmetric-rms"
    summary = "paper"

    def grid(self, bits: int) -> Grid:
        if bits == 1:
            return Grid(RMS_RANGE / 2.0, 0.5, -1, 0)
        top = 2 ** (bits - 1) - 1
        return Grid(RMS_RANGE / top, 0.0, -top, top)

    def statistic(self, w: np.ndarray, axis: int) -> np.ndarray:
        axes = tuple(i for i in range(w.ndim) if i != axis)
        return np.sqrt(np.mean(w * w, axis=axes, keepdims=True, dtype=np.float32)).astype(np.float32)

    def build_statistic(self, g: GraphBuilder, weight: str, rank: int, axis: int) -> str:
        axes = [i for i in range(rank) if i != axis]
        return g.op("Sqrt", [g.reduce("ReduceMean", g.op("Mul", [weight, weight]), axes)])

    def sensitivity_steps(self, w: np.ndarray, axis: int, bits: list[int]) -> np.ndarray:
        # float64 RMS, as the sensitivity weighting has always computed it (within an ulp of the quantizer's)
        w = np.asarray(w, np.float64)
        stat = np.sqrt(np.mean(w * w, axis=tuple(a for a in range(w.ndim) if a != axis)))
        return stat * np.array([self.grid(b).factor for b in bits])

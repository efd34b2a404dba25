"""``pow2-std`` (FAQ, McKinstry et al. 2019: power-of-two step from the LAYER's standard deviation)::

    sigma = sqrt(mean((w - mean(w))^2))             # population std of ALL the layer's float weights, float32:
                                                    # mean, Sub, Mul, mean, Sqrt (ReduceMean/Sub/Mul/ReduceMean/Sqrt)
    x     = max(sigma * (4.12 * 2^(1-B)), 1e-30)    # the factor is float32(4.12) * 2^(1-B), exact
    step  = pow2(x) = 2^ceil(log2 x)                # the smallest power of two >= x, computed exactly
    B >= 2: r = clip(rint(w / step), -2^(B-1), 2^(B-1) - 1);  q = r * step       (signed mid-tread, 0 included)
    B == 1: r = clip(rint(w / step - 0.5), -1, 0);             q = (r + 0.5) * step   (mid-rise: ±step/2)

The kernels of one layer share sigma (taken over every weight of the layer, float kernels
included); each kernel's own B sets its step. numpy and onnxruntime sum the two means in
different orders (sigma can be 1 ulp apart; the power-of-two step differs only if x straddles a
power of two), so lowering takes sigma from onnxruntime
(:func:`impq_onnx.lowering.passes.quantize_weights.simulated_stats`). ``pow2`` is exact in both
implementations (:func:`impq_onnx.quant.quantizers.pow2_ceil`, :meth:`GraphBuilder.pow2_ceil`), so an ``x``
that is exactly a power of two gives ``step = x`` in both, never ``2x``. Lowered as ``c = r`` in
``[-2^(B-1), 2^(B-1) - 1]`` at scale ``step`` (int8's whole range at 8 bits), or ``c`` in ``{-1, +1}`` at
scale ``step / 2`` (1 bit).
"""

from __future__ import annotations

import numpy as np

from impq_onnx.quant.quantizers import GraphBuilder, pow2_ceil
from impq_onnx.quant.schemes.base import Grid, WeightScheme

__all__ = ["Pow2Std", "POW2_STD_RANGE"]

POW2_STD_RANGE = 4.12  # FAQ's weight range in standard deviations (the poster's 4-bit rule)


class Pow2Std(WeightScheme):
    name = "pow2-std"
    summary = "FAQ's power-of-two step"

    def grid(self, bits: int) -> Grid:
        factor = float(np.float32(POW2_STD_RANGE) * np.float32(2.0 ** (1 - bits)))
        if bits == 1:
            return Grid(factor, 0.5, -1, 0)
        return Grid(factor, 0.0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)

    def statistic(self, w: np.ndarray, axis: int) -> np.ndarray:
        w = np.asarray(w, np.float32)
        d = (w - np.mean(w, keepdims=True, dtype=np.float32)).astype(np.float32)
        return np.sqrt(np.mean(d * d, keepdims=True, dtype=np.float32)).astype(np.float32)

    def build_statistic(self, g: GraphBuilder, weight: str, rank: int, axis: int) -> str:
        every = list(range(rank))
        d = g.op("Sub", [weight, g.reduce("ReduceMean", weight, every)])
        return g.op("Sqrt", [g.reduce("ReduceMean", g.op("Mul", [d, d]), every)])

    def step(self, stat: np.ndarray, factor: np.ndarray) -> np.ndarray:
        return pow2_ceil(super().step(stat, factor))

    def build_step(self, g: GraphBuilder, scaled: str) -> str:
        return g.pow2_ceil(scaled)

"""``midrise-rms`` (low-bit weights): the ``midrise-max`` grid with the step that minimizes the squared error of a
Gaussian kernel, per kernel ``k`` with bits ``B``::

    step = RMS(w_k) * G[B]                          # G: the MSE-optimal uniform step of N(0, 1), 2^B levels
    r    = clip(rint(w / step - 0.5), -2^(B-1), 2^(B-1) - 1)
    q    = (r + 0.5) * step                        # levels ±step/2 ... ±(2^B-1) step/2, no zero

``G`` is Max's (1960) optimal uniform quantizer of the unit Gaussian (1 bit: ±0.798 RMS, which is E|w| of a
Gaussian; 2 bits: step 0.996 RMS), computed by :func:`gaussian_step` and frozen in :data:`GAUSSIAN_STEP`.
``max|w_k|`` sets a step about twice too coarse at 1-2 bits: on the bundled ResNet-20, MobileNet-V1 and
Fashion-MNIST kernels the squared error relative to the weights' energy is 0.38 / 0.39 / 0.36 here against
1.41 / 1.23 / 0.82 for ``midrise-max`` at 1 bit, 0.13 / 0.14 / 0.12 against 0.27 / 0.24 / 0.17 at 2 bits,
0.047 / 0.049 / 0.037 against 0.066 / 0.056 / 0.044 at 3 bits. From 4 bits the heavier-than-Gaussian tails of
trained weights make the max rule better: impq takes this scheme by default when its weight target is below 4 bits
(``compress_config.LOW_BIT_TARGET``; two seeds of a 1.74-bit ResNet-20 run, +0.21 / +0.38 test points over
``midrise-max``), ``midrise-max`` otherwise.
``RMS`` is the float32 mean of ``symmetric-rms``, so lowering takes it from onnxruntime. Lowered as
``midrise-max`` is: the odd integers ``c = 2r + 1`` at scale ``step / 2``.
"""

from __future__ import annotations

import math

from impq_onnx.quant.schemes.base import Grid
from impq_onnx.quant.schemes.symmetric_rms import SymmetricRms

__all__ = ["MidriseRms", "GAUSSIAN_STEP", "gaussian_mse", "gaussian_step"]

# gaussian_step(B) for B = 1 .. 16 (golden-section search to 1e-9; tests/quant/test_schemes.py recomputes them)
GAUSSIAN_STEP = (1.5957691, 0.99568670, 0.58601943, 0.33520062, 0.18813878, 0.10406301, 0.056867675,
                 0.030762394, 0.016498964, 0.0087854653, 0.0046498449, 0.0024484079, 0.0012836195,
                 0.00067045409, 0.00034905912, 0.00018122118)


def gaussian_mse(step: float, bits: int) -> float:
    """Mean squared error of the ``2^bits``-level midrise quantizer of step ``step`` on N(0, 1) (closed form)."""
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi) if x != math.inf else 0.0  # noqa: E731
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2))) if x != math.inf else 1.0  # noqa: E731
    second = lambda x: cdf(x) - (x * phi(x) if x != math.inf else 0.0)  # noqa: E731  integral of x^2 phi up to x
    half, total = 2 ** (bits - 1), 0.0
    for i in range(half):  # the positive half; the negative half mirrors it
        a, b, c = i * step, (i + 1) * step if i < half - 1 else math.inf, (i + 0.5) * step
        total += (second(b) - second(a)) + 2 * c * (phi(b) - phi(a)) + c * c * (cdf(b) - cdf(a))
    return 2 * total


def gaussian_step(bits: int, tol: float = 1e-9) -> float:
    """The step minimizing :func:`gaussian_mse` (unimodal in the step): golden-section search on (0, 4]."""
    lo, hi, ratio = 1e-6, 4.0, (math.sqrt(5) - 1) / 2
    while hi - lo > tol:
        m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if gaussian_mse(m1, bits) < gaussian_mse(m2, bits):
            hi = m2
        else:
            lo = m1
    return (lo + hi) / 2


class MidriseRms(SymmetricRms):
    name = "midrise-rms"
    summary = "least squared error below 4 bits"

    def grid(self, bits: int) -> Grid:
        return Grid(GAUSSIAN_STEP[bits - 1], 0.5, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)

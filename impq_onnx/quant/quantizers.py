"""The quantizers, exactly: numpy references and the ONNX subgraphs that simulate them.

Rounding is round-half-to-even everywhere (``np.rint``; onnxruntime's ``FakeQuant`` uses
``nearbyint``). All arithmetic is float32 in the order written here.

Weights: the schemes (``midrise-max``, ``symmetric-rms``, ``pow2-std``, ...) are objects in
:mod:`impq_onnx.quant.schemes`, one module each, that build their numpy reference and ONNX subgraph from
the pieces here (:class:`GraphBuilder`, :func:`pow2_ceil`). Each scheme's statistic (``max|w_k|``,
``RMS(w_k)``, the layer's ``sigma``, ...) is recomputed from the current float shadow weights at every
step; no gradient flows through it. The gradient to the shadow weight is the identity
(straight-through), also for values the clip moved.

Activations (one clip ``c`` per site, bits ``B``)::

    unsigned: step = c * 2^-B;      q = step * clip(rint(clip(x, 0, c) / step), 0, 2^B - 1)
    signed:   step = c * 2^-(B-1);  q = step * clip(rint(clip(x, -c, c) / step), -2^(B-1), 2^(B-1) - 1)

with gradient 1 where ``x`` is inside the clip range and 0 outside.

A learned clip (``act_clip: learned``, fine-tuning only) computes the same function in LSQ's form,
``q = s * rint(clip(x / s, lo, hi))`` with the step ``s = k * p`` a trainable parameter ``p`` times a power of
two ``k`` (:func:`build_learned_activation_quantizer`); the clip is ``s * 2^B`` (``s * 2^(B-1)`` signed).

ONNX construction (onnxruntime 1.19 differentiates all of it): rounding is ``com.microsoft::FakeQuant``
(straight-through, mask always 1 here because its integer range is wide); the weight step passes
through :meth:`GraphBuilder.stop_gradient` (a power of two from ``Pow``'s exponent input times an
integer mantissa through int64: edges onnxruntime's gradient builder never differentiates, and the
value comes back bit-exactly); clamping
corrections are integers moved through ``Cast`` to int32 and back, or derived from ``Greater``, which
the gradient builder also treats as constants. So the forward values equal the formulas (above; a weight scheme's in its module) and the
backward pass is ``dq/dw = step * 1 / step`` (identity up to one float rounding).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "activation_grid",
    "quantize_activation",
    "GraphBuilder",
    "pow2_ceil",
    "build_activation_quantizer",
    "build_learned_activation_quantizer",
    "learned_step_factor",
    "LEARNED_CLIP_GRADIENT_SCALE",
    "TINY",
    "WIDE",
]

WIDE = 1 << 24  # FakeQuant's integer range: wider than any |w/step| so its STE mask stays 1


def pow2_ceil(x: np.ndarray) -> np.ndarray:
    """``2^ceil(log2 x)`` of positive float32 values, exactly (the smallest power of two ``>= x``)."""
    x = np.asarray(x, np.float32)
    mantissa, exponent = np.frexp(x)  # x = mantissa * 2^exponent, mantissa in [0.5, 1)
    exponent = np.where(mantissa == np.float32(0.5), exponent - 1, exponent)
    return np.ldexp(np.float32(1), exponent).astype(np.float32)


def activation_grid(bits: int, clip: float, signed: bool) -> tuple[float, int, int]:
    """``(step, lo, hi)`` integer range of the activation quantizer."""
    if signed:
        return float(np.float32(clip) * np.float32(2.0 ** (1 - bits))), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return float(np.float32(clip) * np.float32(2.0**-bits)), 0, 2**bits - 1


def quantize_activation(x: np.ndarray, bits: int, clip: float, signed: bool) -> np.ndarray:
    step, lo, hi = activation_grid(bits, clip, signed)
    c = np.float32(clip)
    y = np.clip(np.asarray(x, np.float32), -c if signed else np.float32(0), c)
    return (np.clip(np.rint(y / np.float32(step)), lo, hi) * np.float32(step)).astype(np.float32)


TINY = 1e-30  # step floor so an all-zero kernel gives 0/tiny = 0 instead of NaN


class GraphBuilder:
    """Collects nodes and initializers with unique names under one prefix."""

    def __init__(self, prefix: str, opset: int):
        self.prefix = prefix
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}/{hint}_{self._n}"

    def const(self, value, hint: str = "c", dtype=np.float32) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int = 1,
           domain: str = "", **attrs) -> str:
        names = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(op_type), domain=domain, **attrs))
        return names[0]

    def reduce(self, op_type: str, x: str, axes: list[int]) -> str:
        if self.opset >= 18 or op_type == "ReduceSum":
            return self.op(op_type, [x, self.const(axes, "axes", np.int64)], keepdims=1)
        return self.op(op_type, [x], axes=axes, keepdims=1)

    def stop_gradient(self, x: str) -> str:
        """``x`` unchanged (bit-exact), cut from the gradient graph.

        ``x = n * 2^-30 * s`` with ``s = 2^floor(log2|x|)`` from ``Pow``'s exponent input and the integer
        ``n`` through int64: both are edges onnxruntime's gradient builder never differentiates.
        (An inference-mode BatchNormalization's mean input is not usable: training rewrites every
        BatchNormalization into training mode.)
        """
        magnitude = self.op("Max", [self.op("Abs", [x]), self.const(TINY, "tiny")])
        exponent = self.op("Floor", [self.op("Mul", [self.op("Log", [magnitude]), self.const(1.0 / np.log(2.0), "inv_ln2")])])
        scale = self.op("Pow", [self.const(2.0, "two"), exponent])
        mantissa = self.op("Mul", [self.op("Div", [x, scale]), self.const(2.0**30, "two30")])
        integer = self.op("Cast", [self.op("Cast", [mantissa], to=TensorProto.INT64)], to=TensorProto.FLOAT)
        return self.op("Mul", [self.op("Mul", [integer, self.const(2.0**-30, "two_30")]), scale])

    def round_ste(self, x: str, scale: str | None = None, lo: int = -WIDE, hi: int = WIDE) -> str:
        """``rint(x / scale) * scale`` (scalar scale, default 1) with a straight-through gradient."""
        scale = scale or self.const(1.0, "one")
        return self.op("FakeQuant", [x, scale, self.const(0.0, "zero")], outputs=2, domain="com.microsoft",
                       quant_min=lo, quant_max=hi)

    def pow2_ceil(self, x: str) -> str:
        """``2^ceil(log2 x)`` of a positive tensor, exactly (as :func:`pow2_ceil`), without gradient.

        ``p = 2^(floor(log2 x) - 1)`` from ``Log``/``Floor``/``Pow`` is a power of two at most one
        exponent off either way, so ``p <= 2^ceil(log2 x) <= 8p``; three steps ``p *= 1 + (p < x)``
        (exact: doubling, and a ``Less`` compare) reach the smallest power of two ``>= x``. No
        floating-point rounding of ``log2`` can move the result at an exact power of two.
        """
        exponent = self.op("Floor", [self.op("Mul", [self.op("Log", [x]), self.const(1.0 / np.log(2.0), "inv_ln2")])])
        p = self.op("Pow", [self.const(2.0, "two"), self.op("Sub", [exponent, self.const(1.0, "one")])])
        one = self.const(1.0, "one")
        for _ in range(3):
            below = self.op("Cast", [self.op("Less", [p, x])], to=TensorProto.FLOAT)
            p = self.op("Mul", [p, self.op("Add", [below, one])])
        return p

    def integer_stop_gradient(self, x: str) -> str:
        """An integer-valued float tensor, unchanged, without gradient (Cast to int32 and back)."""
        as_int = self.op("Cast", [x], to=TensorProto.INT32)
        return self.op("Cast", [as_int], to=TensorProto.FLOAT)


def build_activation_quantizer(g: GraphBuilder, x: str, bits: int, clip: float, signed: bool) -> str:
    """Append an activation quantizer for tensor ``x``; returns the quantized tensor's name."""
    step, lo, hi = activation_grid(bits, clip, signed)
    low = g.const(-clip if signed else 0.0, "clip_lo")
    y = g.op("Clip", [x, low, g.const(clip, "clip_hi")])
    step_name = g.const(step, "step")
    # FakeQuant's own range reaches one past the top level so its mask never cuts the gradient
    # inside (lo, c); the top level is then taken down with a gradient-free correction.
    f = g.round_ste(y, step_name, lo, hi + 1)
    over = g.op("Cast", [g.op("Greater", [f, g.const((hi + 0.5) * step, "top")])], to=TensorProto.FLOAT)
    return g.op("Sub", [f, g.op("Mul", [over, step_name])], hint="aq")


# The learned activation step's gradient scale, in multiples of LSQ's ``1 / sqrt(N * Q_p)``: screened on both
# MobileNet-V1 W4A4 plans (bench/results/candidates.md, "Learned activation clips"), where 1 did not help.
LEARNED_CLIP_GRADIENT_SCALE = 300.0


def learned_step_factor(elements: int, bits: int, signed: bool, scale: float = LEARNED_CLIP_GRADIENT_SCALE) -> float:
    """``k`` of the learned step ``s = k * p``: the power of two nearest ``sqrt(scale / sqrt(N * Q_p))`` (``N`` the
    site's elements per sample, ``Q_p`` the top level), so that plain SGD on ``p`` moves ``s`` with LSQ's gradient
    scale times ``scale`` (within a factor of 2). A power of two makes ``s = k * p`` and ``p = s / k`` exact, so a
    clip written into the plan and read back gives the same ``p``, bit for bit."""
    top = activation_grid(bits, 1.0, signed)[2]
    ideal = np.sqrt(scale / np.sqrt(max(1, elements) * top))
    return float(2.0 ** np.round(np.log2(ideal)))


def build_learned_activation_quantizer(g: GraphBuilder, x: str, bits: int, signed: bool, p: str, k: float) -> str:
    """Append ``s * rint(clip(x / s, lo, hi))`` with ``s = |p| * k`` (``p`` a trainable scalar initializer; the
    absolute value keeps a step that a large learning rate pushed past zero a step) and a straight-through
    rounding: ``s``'s gradient is LSQ's (``rint(x/s) - x/s`` inside the range, the range's end outside it),
    ``x``'s is 1 inside the range and 0 outside. At ``p = step / k`` its forward values are
    :func:`build_activation_quantizer`'s."""
    _, lo, hi = activation_grid(bits, 1.0, signed)
    s = g.op("Mul", [g.op("Abs", [p]), g.const(k, "k")], hint="learned_step")
    level = g.op("Max", [g.op("Min", [g.op("Div", [x, s]), g.const(float(hi), "hi")]), g.const(float(lo), "lo")])
    return g.op("Mul", [g.round_ste(level), s], hint="aq")

"""The quantizers, exactly: numpy references and the ONNX subgraphs that simulate them.

Rounding is round-half-to-even everywhere (``np.rint``; onnxruntime's ``FakeQuant`` uses
``nearbyint``). All arithmetic is float32 in the order written here.

Weights, per kernel ``k`` (one output channel) with bits ``B``; a kernel with bits ``None`` stays float.

``midrise-max`` (reference code)::

    step = max|w_k| * 2^(1-B)                       # = 2 max|w_k| / 2^B
    r    = clip(rint(w / step - 0.5), -2^(B-1), 2^(B-1) - 1)
    q    = (r + 0.5) * step                        # levels ±step/2 ... ±(2^B-1) step/2, no zero

    1 bit: {±max/2}; 2 bits: {±max/4, ±3max/4}.

``symmetric-rms`` (paper text: clip at d = 4 RMS(w_k), zero level)::

    B >= 2: step = d / (2^(B-1) - 1);  r = clip(rint(w / step), -(2^(B-1)-1), 2^(B-1)-1);  q = r * step
            (2^B - 1 levels, symmetric, 0 included, ±d the extreme levels)
    B == 1: step = d / 2;  r = clip(rint(w / step - 0.5), -1, 0);  q = (r + 0.5) * step
            (= sign(w) * RMS(w_k): a zero-free 1-bit grid; ±d would be far too coarse)

``pow2-std`` (FAQ, McKinstry et al. 2019: power-of-two step from the LAYER's standard deviation)::

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
    implementations: numpy takes it from ``frexp`` (no rounding); the ONNX graph takes a first guess
    ``p = 2^(floor(log2 x) - 1)`` (``Log``, ``Floor``, ``Pow``: at most one off) and doubles it while
    ``p < x`` (three exact compare-and-double steps), so an ``x`` that is exactly a power of two gives
    ``step = x`` in both, never ``2x``.

The statistic (``max|w_k|``, ``RMS(w_k)`` or the layer's ``sigma``) is recomputed from the current
float shadow weights at every step; no gradient flows through it. The gradient to the shadow weight is the identity
(straight-through), also for values the clip moved.

Activations (one clip ``c`` per site, bits ``B``)::

    unsigned: step = c * 2^-B;      q = step * clip(rint(clip(x, 0, c) / step), 0, 2^B - 1)
    signed:   step = c * 2^-(B-1);  q = step * clip(rint(clip(x, -c, c) / step), -2^(B-1), 2^(B-1) - 1)

with gradient 1 where ``x`` is inside the clip range and 0 outside.

ONNX construction (onnxruntime 1.19 differentiates all of it): rounding is ``com.microsoft::FakeQuant``
(straight-through, mask always 1 here because its integer range is wide); the weight step passes
through :meth:`GraphBuilder.stop_gradient` (a power of two from ``Pow``'s exponent input times an
integer mantissa through int64: edges onnxruntime's gradient builder never differentiates, and the
value comes back bit-exactly); clamping
corrections are integers moved through ``Cast`` to int32 and back, or derived from ``Greater``, which
the gradient builder also treats as constants. So the forward values equal the formulas above and the
backward pass is ``dq/dw = step * 1 / step`` (identity up to one float rounding).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "weight_grid",
    "quantize_weight",
    "activation_grid",
    "quantize_activation",
    "GraphBuilder",
    "build_weight_quantizer",
    "build_weight_stat",
    "pow2_ceil",
    "POW2_STD_RANGE",
    "build_activation_quantizer",
]

_WIDE = 1 << 24  # FakeQuant's integer range: wider than any |w/step| so its STE mask stays 1


POW2_STD_RANGE = 4.12  # FAQ's weight range in standard deviations (the poster's 4-bit rule)


def weight_grid(bits: int, scheme: str) -> tuple[float, float, int, int]:
    """``(factor, offset, lo, hi)``: ``step = stat * factor`` (``pow2(stat * factor)`` for ``pow2-std``),
    ``q = (clip(rint(w/step - offset), lo, hi) + offset) * step``."""
    if scheme == "midrise-max":
        return 2.0 ** (1 - bits), 0.5, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if scheme == "symmetric-rms":
        if bits == 1:
            return 4.0 / 2.0, 0.5, -1, 0
        top = 2 ** (bits - 1) - 1
        return 4.0 / top, 0.0, -top, top
    if scheme == "pow2-std":
        factor = float(np.float32(POW2_STD_RANGE) * np.float32(2.0 ** (1 - bits)))
        if bits == 1:
            return factor, 0.5, -1, 0
        return factor, 0.0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    raise ValueError(f"unknown weight scheme {scheme!r}")


def _kernel_stat(w: np.ndarray, axis: int, scheme: str) -> np.ndarray:
    """The scheme's statistic, keepdims: per kernel, or (``pow2-std``) one for the whole layer."""
    axes = tuple(i for i in range(w.ndim) if i != axis)
    if scheme == "midrise-max":
        return np.max(np.abs(w), axis=axes, keepdims=True)
    if scheme == "pow2-std":
        w = np.asarray(w, np.float32)
        d = (w - np.mean(w, keepdims=True, dtype=np.float32)).astype(np.float32)
        return np.sqrt(np.mean(d * d, keepdims=True, dtype=np.float32)).astype(np.float32)
    return np.sqrt(np.mean(w * w, axis=axes, keepdims=True, dtype=np.float32)).astype(np.float32)


def pow2_ceil(x: np.ndarray) -> np.ndarray:
    """``2^ceil(log2 x)`` of positive float32 values, exactly (the smallest power of two ``>= x``)."""
    x = np.asarray(x, np.float32)
    mantissa, exponent = np.frexp(x)  # x = mantissa * 2^exponent, mantissa in [0.5, 1)
    exponent = np.where(mantissa == np.float32(0.5), exponent - 1, exponent)
    return np.ldexp(np.float32(1), exponent).astype(np.float32)


def _step(stat: np.ndarray, factor: np.ndarray, scheme: str) -> np.ndarray:
    """The quantization step from the statistic and the per-kernel factor (float32)."""
    step = np.maximum(np.asarray(stat, np.float32) * factor, np.float32(_TINY))
    return pow2_ceil(step) if scheme == "pow2-std" else step


def quantize_weight(w: np.ndarray, bits: list[int | None], axis: int, scheme: str) -> np.ndarray:
    """The reference (numpy) weight quantizer; see the module docstring."""
    w = np.asarray(w, np.float32)
    shape = [1] * w.ndim
    shape[axis] = w.shape[axis]
    grids = [weight_grid(b, scheme) if b is not None else (1.0, 0.0, -_WIDE, _WIDE) for b in bits]
    factor, offset, lo, hi = (np.array(v, np.float32).reshape(shape) for v in zip(*grids))
    step = _step(_kernel_stat(w, axis, scheme), factor, scheme)
    r = np.clip(np.rint(w / step - offset), lo, hi)
    q = ((r + offset) * step).astype(np.float32)
    floating = np.array([b is None for b in bits]).reshape(shape)
    return np.where(floating, w, q)


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


_TINY = 1e-30  # step floor so an all-zero kernel gives 0/tiny = 0 instead of NaN


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
        magnitude = self.op("Max", [self.op("Abs", [x]), self.const(_TINY, "tiny")])
        exponent = self.op("Floor", [self.op("Mul", [self.op("Log", [magnitude]), self.const(1.0 / np.log(2.0), "inv_ln2")])])
        scale = self.op("Pow", [self.const(2.0, "two"), exponent])
        mantissa = self.op("Mul", [self.op("Div", [x, scale]), self.const(2.0**30, "two30")])
        integer = self.op("Cast", [self.op("Cast", [mantissa], to=TensorProto.INT64)], to=TensorProto.FLOAT)
        return self.op("Mul", [self.op("Mul", [integer, self.const(2.0**-30, "two_30")]), scale])

    def round_ste(self, x: str, scale: str | None = None, lo: int = -_WIDE, hi: int = _WIDE) -> str:
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


def build_weight_stat(g: GraphBuilder, weight: str, rank: int, axis: int, scheme: str) -> str:
    """The scheme's statistic of ``weight`` (keepdims), as :func:`_kernel_stat` computes it."""
    axes = [i for i in range(rank) if i != axis]
    if scheme == "midrise-max":
        return g.reduce("ReduceMax", g.op("Abs", [weight]), axes)
    if scheme == "pow2-std":
        every = list(range(rank))
        d = g.op("Sub", [weight, g.reduce("ReduceMean", weight, every)])
        return g.op("Sqrt", [g.reduce("ReduceMean", g.op("Mul", [d, d]), every)])
    return g.op("Sqrt", [g.reduce("ReduceMean", g.op("Mul", [weight, weight]), axes)])


def build_weight_quantizer(g: GraphBuilder, weight: str, shape: tuple[int, ...], axis: int,
                           bits: list[int | None], scheme: str) -> str:
    """Append the weight quantizer of one layer to ``g``; returns the quantized weight's name."""
    rank, kernels = len(shape), shape[axis]
    bshape = [1] * rank
    bshape[axis] = kernels
    grids = [weight_grid(b, scheme) if b is not None else (1.0, 0.0, -_WIDE, _WIDE) for b in bits]
    factor, offset, lo, hi = (np.array(v, np.float32).reshape(bshape) for v in zip(*grids))
    stat = build_weight_stat(g, weight, rank, axis, scheme)
    step = g.op("Max", [g.op("Mul", [stat, g.const(factor, "factor")]), g.const(_TINY, "tiny")], hint="step")
    if scheme == "pow2-std":
        step = g.pow2_ceil(step)
    step = g.stop_gradient(step)
    u = g.op("Div", [weight, step])
    has_offset = bool(np.any(offset))
    if has_offset:
        offset_name = g.const(offset, "offset")
        u = g.op("Sub", [u, offset_name])
    r = g.round_ste(u)
    clamped = g.op("Max", [g.op("Min", [r, g.const(hi, "hi")]), g.const(lo, "lo")])
    r = g.op("Sub", [r, g.integer_stop_gradient(g.op("Sub", [r, clamped]))], hint="level")
    if has_offset:
        r = g.op("Add", [r, offset_name])
    q = g.op("Mul", [r, step], hint="wq")
    if any(b is None for b in bits):
        floating = np.array([b is None for b in bits]).reshape(bshape)
        q = g.op("Where", [g.const(floating, "float_kernels", np.bool_), weight, q], hint="wq")
    return q


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

"""What a weight quantization scheme is, and the registry of schemes by name.

A :class:`WeightScheme` owns everything that differs between weight quantizers, so that simulation,
lowering, verification, sensitivity and the option lists all read it from one object:

- :meth:`~WeightScheme.grid`: per bit width the integer grid ``(factor, offset, lo, hi)``;
- :meth:`~WeightScheme.statistic` / :meth:`~WeightScheme.build_statistic`: the statistic the step scales
  (numpy reference and the ONNX ops computing the same value; per kernel or one per layer, keepdims);
- :meth:`~WeightScheme.step` / :meth:`~WeightScheme.build_step`: ``step = stat * factor`` (floored at
  ``1e-30``), optionally mapped (e.g. onto a power of two).

From these the base class derives, with one float32 arithmetic for all of them::

    q = (clip(rint(w / step - offset), lo, hi) + offset) * step         # a kernel with bits None stays float

- :meth:`~WeightScheme.quantize` (numpy reference) and :meth:`~WeightScheme.build_quantizer` (the ONNX
  simulation subgraph, straight-through gradient);
- :meth:`~WeightScheme.integer_codes`, :meth:`~WeightScheme.code_bounds` and
  :meth:`~WeightScheme.container_bits` (lowering: an offset-``1/2`` grid stores the odd integers
  ``2r + 1`` at scale ``step/2``, any other grid ``r`` at scale ``step``);
- :meth:`~WeightScheme.sensitivity_steps` (the per-kernel step the sensitivity ``step`` weighting squares).

A new scheme is a subclass in its own module and one :func:`register` line in
:mod:`impq_onnx.quant.schemes`; everything above then works for it.
"""

from __future__ import annotations

import abc
import difflib
from typing import ClassVar, NamedTuple

import numpy as np

from impq_onnx.errors import PlanError
from impq_onnx.quant.quantizers import TINY, WIDE, GraphBuilder

__all__ = ["Grid", "WeightScheme", "SCHEMES", "register", "weight_scheme", "scheme_names"]


class Grid(NamedTuple):
    """``step = stat * factor`` (then :meth:`WeightScheme.step`); levels ``(r + offset) * step``, ``r`` in
    ``lo .. hi``."""

    factor: float
    offset: float
    lo: int
    hi: int


class WeightScheme(abc.ABC):
    """One weight quantizer. Subclasses set ``name`` and ``summary`` and define grid, statistic and its ONNX ops."""

    name: ClassVar[str]
    summary: ClassVar[str]  # a few words for the option help: "reference code", "paper"
    exact_statistic: ClassVar[bool] = False  # numpy's statistic equals onnxruntime's bit for bit in any sum order

    @abc.abstractmethod
    def grid(self, bits: int) -> Grid:
        """The integer grid of a ``bits``-bit kernel."""

    @abc.abstractmethod
    def statistic(self, w: np.ndarray, axis: int) -> np.ndarray:
        """float32, keepdims: one value per kernel along ``axis``, or one for the whole tensor."""

    @abc.abstractmethod
    def build_statistic(self, g: GraphBuilder, weight: str, rank: int, axis: int) -> str:
        """Append the ops computing :meth:`statistic` of ``weight`` to ``g``; returns the output name."""

    def step(self, stat: np.ndarray, factor: np.ndarray) -> np.ndarray:
        """The quantization step (float32) from the statistic and the per-kernel factor."""
        return np.maximum(np.asarray(stat, np.float32) * factor, np.float32(TINY))

    def build_step(self, g: GraphBuilder, scaled: str) -> str:
        """The ONNX counterpart of :meth:`step` after ``Max(stat * factor, 1e-30)``: here nothing more."""
        return scaled

    # ---- derived: numpy reference and ONNX simulation -------------------------------------------------

    def _grids(self, bits: list[int | None], shape: list[int], floating: Grid) -> tuple[np.ndarray, ...]:
        grids = [self.grid(b) if b is not None else floating for b in bits]
        return tuple(np.array(v, np.float32).reshape(shape) for v in zip(*grids))

    def _statistic(self, w: np.ndarray, axis: int, stat: np.ndarray | None, shape: list[int]) -> np.ndarray:
        if stat is None:
            return self.statistic(w, axis)
        stat = np.asarray(stat, np.float32)
        return stat.reshape([1] * w.ndim if stat.size == 1 else shape)

    def quantize(self, w: np.ndarray, bits: list[int | None], axis: int, stat: np.ndarray | None = None) -> np.ndarray:
        """The reference (numpy) quantizer of one layer weight, per kernel along ``axis``.

        ``stat`` (per kernel, or one value) replaces the numpy statistic: with the value onnxruntime computes
        (:func:`impq_onnx.lowering.passes.quantize_weights.simulated_stats`) the result equals the simulation
        bit for bit; without it, a statistic that is a float32 sum may be an ulp off (``exact_statistic``).
        """
        w = np.asarray(w, np.float32)
        shape = _kernel_shape(w.ndim, axis, w.shape[axis])
        factor, offset, lo, hi = self._grids(bits, shape, Grid(1.0, 0.0, -WIDE, WIDE))
        step = self.step(self._statistic(w, axis, stat, shape), factor)
        r = np.clip(np.rint(w / step - offset), lo, hi)
        q = ((r + offset) * step).astype(np.float32)
        floating = np.array([b is None for b in bits]).reshape(shape)
        return np.where(floating, w, q)

    def build_quantizer(self, g: GraphBuilder, weight: str, shape: tuple[int, ...], axis: int,
                        bits: list[int | None]) -> str:
        """Append the simulated quantizer of one layer weight to ``g``; returns the quantized weight's name.

        Forward values equal :meth:`quantize`; the step is cut from the gradient and the rounding and
        clamping are straight-through (:mod:`impq_onnx.quant.quantizers`).
        """
        rank = len(shape)
        bshape = _kernel_shape(rank, axis, shape[axis])
        factor, offset, lo, hi = self._grids(bits, bshape, Grid(1.0, 0.0, -WIDE, WIDE))
        stat = self.build_statistic(g, weight, rank, axis)
        step = g.op("Max", [g.op("Mul", [stat, g.const(factor, "factor")]), g.const(TINY, "tiny")], hint="step")
        step = g.stop_gradient(self.build_step(g, step))
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

    # ---- derived: lowering ----------------------------------------------------------------------------

    def code_bounds(self, bits: int | None) -> tuple[int, int, bool]:
        """``(lo, hi, odd)``: the stored integer range of one kernel, and whether codes are odd only.

        A float kernel (``None``) stores only 0.
        """
        if bits is None:
            return 0, 0, False
        _, offset, lo, hi = self.grid(bits)
        if offset:
            return 2 * lo + 1, 2 * hi + 1, True
        return lo, hi, False

    def container_bits(self, bits: int | None) -> int:
        """Bit width of a signed narrow-range integer that holds the kernel's codes (at least 2)."""
        lo, hi, _ = self.code_bounds(bits)
        return max(2, max(abs(lo), abs(hi)).bit_length() + 1)

    def integer_codes(self, w: np.ndarray, bits: list[int | None], axis: int,
                      stat: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(codes, scale)``: int64 codes (0 for float kernels) and the float32 scale per kernel
        (1 for float kernels) with ``codes * scale == quantize(w)`` on every quantized kernel, bit for bit.

        ``stat`` as in :meth:`quantize`; lowering passes the value onnxruntime computed for the simulation.
        """
        w = np.asarray(w, np.float32)
        shape = _kernel_shape(w.ndim, axis, w.shape[axis])
        factor, offset, lo, hi = self._grids(bits, shape, Grid(1.0, 0.0, 0, 0))
        step = self.step(self._statistic(w, axis, stat, shape), factor)
        r = np.clip(np.rint(w / step - offset), lo, hi)
        odd = offset != 0
        codes = np.where(odd, 2 * r + 1, r)
        scale = np.where(odd, step / np.float32(2), step).astype(np.float32)
        floating = np.array([b is None for b in bits]).reshape(shape)
        if floating.any():
            codes = np.where(floating, 0, codes)
            scale = np.where(floating, np.float32(1), scale)
        return codes.astype(np.int64), scale.reshape(-1)

    # ---- sensitivity ----------------------------------------------------------------------------------

    def sensitivity_steps(self, w: np.ndarray, axis: int, bits: list[int]) -> np.ndarray:
        """float64 per kernel: the step at ``bits`` that the sensitivity ``step`` weighting squares.

        By default the quantizer's own float32 step of the float weights.
        """
        w = np.asarray(w, np.float32)
        factor = np.array([self.grid(b).factor for b in bits], np.float32)
        factor = factor.reshape(_kernel_shape(w.ndim, axis, len(bits)))
        step = self.step(self.statistic(w, axis), factor)
        return np.broadcast_to(step, factor.shape).reshape(-1).astype(np.float64)


def _kernel_shape(rank: int, axis: int, kernels: int) -> list[int]:
    shape = [1] * rank
    shape[axis] = kernels
    return shape


SCHEMES: dict[str, WeightScheme] = {}


def register(scheme: WeightScheme) -> WeightScheme:
    """Make ``scheme`` available by its name to plans, options and every stage."""
    if scheme.name in SCHEMES and type(SCHEMES[scheme.name]) is not type(scheme):
        raise PlanError(f"weight scheme '{scheme.name}' is already registered by {type(SCHEMES[scheme.name]).__name__}")
    SCHEMES[scheme.name] = scheme
    return scheme


def scheme_names() -> tuple[str, ...]:
    return tuple(SCHEMES)


def weight_scheme(name: str) -> WeightScheme:
    """The registered scheme called ``name``; an unknown name is a one-line :class:`PlanError`."""
    if isinstance(name, str) and name in SCHEMES:
        return SCHEMES[name]
    close = difflib.get_close_matches(str(name), list(SCHEMES), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; use one of {', '.join(SCHEMES)}"
    raise PlanError(f"weight_scheme {name!r} is unknown{hint}")

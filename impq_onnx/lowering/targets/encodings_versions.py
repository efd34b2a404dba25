"""AIMET encodings files in the versions 0.6.1, 1.0.0 and 2.0.0, written from one description of the grids.

Specification: AIMET ``Docs/techniques/encoding_spec.rst`` (qualcomm/aimet); the schemas the tests
validate against are in ``tests/lowering/targets/schemas/``. What each version means, with ``s`` the
scale:

- **0.6.1**: ``{tensor: [entry per channel]}``; ``real = (q + offset) · s``, ``q`` in ``0 .. 2^bitwidth - 1``,
  ``bitwidth`` 4..32, ``is_symmetric`` the string ``"True"``/``"False"``; float entries ``{dtype: float, bitwidth}``.
- **1.0.0**: lists of ``{name, enc_type, dtype, bw, is_sym, scale[], offset[]}``; one ``bw`` per tensor
  (per-channel ``scale``/``offset`` arrays), ``bw`` 2..32, no float channels inside an integer tensor.
- **2.0.0**: ``{"version", "encodings": [{name, output_dtype, y_scale, y_zero_point?, axis?}]}``, the
  ``QuantizeLinear`` convention ``real = (q - y_zero_point) · s`` with ``q`` in the range of
  ``output_dtype`` (``int2 … int32``, ``uint2 … uint16``); a float zero point only for 2-bit types.

Weights (exact, widening documented): a kernel's stored codes ``n`` (``value = n · scale``, the sidecar's
``code``/``scale``) fit a signed integer of ``width(n)`` bits: ``B`` for ``symmetric-rms`` and ``pow2-std``
(the true width), ``B + 1`` for a ``B``-bit ``midrise-max`` kernel (odd codes ``±1, ±3, …`` at
``step/2``): integer grids with an integer offset cannot hold the midrise levels ``(r + 1/2) · step``,
so midrise kernels are written as the ``(B+1)``-bit grid at ``step/2`` that contains them. The
exception is 2.0.0 ``int2`` (the spec's custom grid ``y_zero_point = -0.5``): ``(q + 1/2) · step`` with
``q`` in ``-2 .. 1`` is the 2-bit (and 1-bit) midrise grid at its true width. A width below what a
version can state is widened (0.6.1: to 4; 1.0.0: one ``bw`` per tensor, the largest kernel's, at
least 2; 2.0.0: one type per tensor, the next of int2/int4/int8/int16/int32). Widening a weight is
exact: the model's float weights are already on their grids, and a wider grid with the same scale
and a symmetric range contains them. The true per-kernel ``B`` is in the ``.bits.json`` sidecar.

Activations: a width a version cannot state (0.6.1: below 4 bits; 1.0.0: 1 bit; 2.0.0: other than 2, 4,
8, 16) is widened the same way (:func:`activation_width`), and the model keeps that site's B-bit ``Clip``
(``lo·step .. hi·step``) in front of the encoded tensor, so the wider grid with the same step sees only
B-bit values: exact, as the QDQ chain (whose Clip it is). A float channel inside an integer weight
cannot be stated in 1.0.0 or 2.0.0 (one encoding per tensor): a :class:`~impq_onnx.errors.PlanError`
naming the tensor.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from impq_onnx.errors import PlanError

__all__ = ["activation_width", "KernelGrid", "ActivationGrid", "Encoding", "VERSIONS", "write_version", "read_version",
           "signed_width"]

VERSIONS = ("0.6.1", "1.0.0", "2.0.0")
_V2_WIDTHS = (2, 4, 8, 16, 32)


def activation_width(version: str, bits: int) -> int:
    """The activation width ``version`` states for a ``bits``-bit site (wider: the model keeps the site's Clip)."""
    if version == "2.0.0":
        return next(w for w in (2, 4, 8, 16) if w >= bits) if bits <= 16 else bits
    return max(4 if version == "0.6.1" else 2, bits)


def signed_width(lo: int, hi: int) -> int:
    """Bits of the narrowest signed integer holding ``lo .. hi``."""
    return max((-lo - 1).bit_length() if lo < 0 else 0, hi.bit_length()) + 1


@dataclasses.dataclass(frozen=True)
class KernelGrid:
    """One kernel: ``value = n · scale`` for integers ``n`` in ``lo .. hi`` (odd only if ``odd``).

    ``stored_bits``/``stored_signed`` are set for a kernel of another tool's model (no plan): its grid is
    the stored integer type, with ``lo``/``hi`` already shifted by the zero point.
    """

    scale: float
    lo: int
    hi: int
    odd: bool = False
    stored_bits: int | None = None
    stored_signed: bool = True

    @property
    def symmetric(self) -> bool:
        return self.stored_bits is None

    @property
    def width(self) -> int:
        return self.stored_bits if self.stored_bits is not None else max(2, signed_width(self.lo, self.hi))

    def offset(self, bw: int) -> int:
        return -(2 ** (bw - 1)) if self.symmetric else self.lo


@dataclasses.dataclass(frozen=True)
class ActivationGrid:
    """``value = n · scale``, ``n`` in ``lo .. hi``: the ``bits``-bit range, signed or not, zero point included."""

    scale: float
    lo: int
    hi: int
    bits: int
    signed: bool
    zero_point: int

    def offset(self, width: int) -> int:
        """The low end of the ``width``-bit range that contains ``lo .. hi`` (``lo`` itself at the true width)."""
        if width == self.bits:
            return self.lo
        return -(2 ** (width - 1)) if self.signed else 0


@dataclasses.dataclass(frozen=True)
class Encoding:
    """A read-back encoding: ``value = (n + shift) · scale`` for integers ``n`` in ``lo .. hi``."""

    scale: float
    lo: int
    hi: int
    shift: float = 0.0


def _f(x: float) -> float:
    return float(np.float32(x))


def _v061_entry(bw: int, offset: int, scale: float, symmetric: bool) -> dict:
    s = np.float32(scale)
    return {"bitwidth": int(bw), "dtype": "int", "is_symmetric": str(symmetric),
            "min": float(np.float32(offset) * s), "max": float(np.float32(offset + 2**bw - 1) * s),
            "offset": int(offset), "scale": float(s)}


def _unexpressible(version: str, tensor: str, what: str, fix: str) -> PlanError:
    return PlanError(f"encodings {version}: '{tensor}' {what}; {fix}")


def _v061(params: dict, activations: dict, quantizer_args: dict) -> dict:
    param_encodings = {}
    for name, (kernels, _) in params.items():
        param_encodings[name] = [
            {"bitwidth": 32, "dtype": "float"} if k is None
            else _v061_entry(bw := max(4, k.width) if k.symmetric else k.width, k.offset(bw), k.scale, k.symmetric)
            for k in kernels]
    activation_encodings = {}
    for name, a in activations.items():
        bw = activation_width("0.6.1", a.bits)
        activation_encodings[name] = [_v061_entry(bw, a.offset(bw), a.scale, a.signed and a.zero_point == 0)]
    args = {"activation_bitwidth": quantizer_args["activation_bitwidth"], "dtype": "int",
            "is_symmetric": str(quantizer_args["is_symmetric"]), "param_bitwidth": quantizer_args["param_bitwidth"],
            "per_channel_quantization": "True", "quant_scheme": quantizer_args["quant_scheme"]}
    return {"version": "0.6.1", "activation_encodings": activation_encodings, "param_encodings": param_encodings,
            "excluded_layers": [], "quantizer_args": args}


def _no_float(version: str, name: str, kernels: list) -> None:
    if any(k is None for k in kernels):
        raise _unexpressible(version, name, "mixes float and integer kernels, and the version has one encoding per "
                             "tensor", "use encodings_version 0.6.1 or the qdq format")


def _v100(params: dict, activations: dict, quantizer_args: dict) -> dict:
    param_encodings = []
    for name, (kernels, _) in params.items():
        _no_float("1.0.0", name, kernels)
        bw = max(k.width for k in kernels)
        symmetric = all(k.symmetric for k in kernels)
        param_encodings.append({"name": name, "enc_type": "PER_CHANNEL" if len(kernels) > 1 else "PER_TENSOR",
                                "dtype": "INT", "bw": bw, "is_sym": symmetric,
                                "scale": [_f(k.scale) for k in kernels], "offset": [k.offset(bw) for k in kernels]})
    activation_encodings = []
    for name, a in activations.items():
        bw = activation_width("1.0.0", a.bits)
        activation_encodings.append({"name": name, "enc_type": "PER_TENSOR", "dtype": "INT", "bw": bw,
                                     "is_sym": a.signed and a.zero_point == 0, "scale": [_f(a.scale)],
                                     "offset": [a.offset(bw)]})
    args = {"activation_bitwidth": quantizer_args["activation_bitwidth"], "dtype": "int",
            "is_symmetric": quantizer_args["is_symmetric"], "param_bitwidth": quantizer_args["param_bitwidth"],
            "per_channel_quantization": True, "quant_scheme": quantizer_args["quant_scheme"]}
    return {"version": "1.0.0", "activation_encodings": activation_encodings, "param_encodings": param_encodings,
            "excluded_layers": [], "quantizer_args": args}


def _v200_param(name: str, kernels: list, axis: int) -> dict:
    _no_float("2.0.0", name, kernels)
    entry: dict = {"name": name}
    if all(not k.symmetric for k in kernels):  # another tool's integers: its type and zero points
        stored = kernels[0]
        entry["output_dtype"] = f"{'int' if stored.stored_signed else 'uint'}{stored.stored_bits}"
        low = -(2 ** (stored.stored_bits - 1)) if stored.stored_signed else 0
        zero = [low - k.lo for k in kernels]
        entry["y_scale"] = [_f(k.scale) for k in kernels]
        if any(zero):
            entry["y_zero_point"] = zero
    elif all((k.odd and -2 <= (k.lo - 1) // 2 and (k.hi - 1) // 2 <= 1) or (not k.odd and -2 <= k.lo and k.hi <= 1)
             for k in kernels):  # int2 at the true width: midrise by the spec's custom grid (zero point -0.5)
        entry["output_dtype"] = "int2"
        entry["y_scale"] = [_f(2 * k.scale) if k.odd else _f(k.scale) for k in kernels]
        entry["y_zero_point"] = [-0.5 if k.odd else 0 for k in kernels]
    else:
        width = max(k.width for k in kernels)
        entry["output_dtype"] = f"int{next(w for w in _V2_WIDTHS if w >= width)}"
        entry["y_scale"] = [_f(k.scale) for k in kernels]
    if len(kernels) == 1:
        entry["y_scale"] = entry["y_scale"][0]
        if "y_zero_point" in entry:
            entry["y_zero_point"] = entry["y_zero_point"][0]
    else:
        entry["axis"] = axis
    return entry


def _v200(params: dict, activations: dict, quantizer_args: dict) -> dict:
    encodings = [_v200_param(name, kernels, axis) for name, (kernels, axis) in params.items()]
    for name, a in activations.items():
        bw = activation_width("2.0.0", a.bits)
        entry = {"name": name, "output_dtype": f"{'int' if a.signed else 'uint'}{bw}", "y_scale": _f(a.scale)}
        low = -(2 ** (bw - 1)) if a.signed else 0
        if a.offset(bw) != low:
            entry["y_zero_point"] = low - a.offset(bw)
        encodings.append(entry)
    return {"version": "2.0.0", "encodings": encodings}


def write_version(version: str, params: dict, activations: dict, quantizer_args: dict) -> dict:
    """The encodings JSON of ``version``. ``params``: ``{tensor: ([KernelGrid | None per channel], axis)}``;
    ``activations``: ``{tensor: ActivationGrid}``; ``quantizer_args``: activation/param bitwidth, symmetry, scheme."""
    writers = {"0.6.1": _v061, "1.0.0": _v100, "2.0.0": _v200}
    if version not in writers:
        raise PlanError(f"encodings_version {version!r} is unknown; use one of {', '.join(VERSIONS)}")
    return writers[version](params, activations, quantizer_args)


def _dtype_range(name: str) -> tuple[int, int]:
    bits = int(name.lstrip("uint"))
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if name.startswith("int") else (0, 2**bits - 1)


def _v2_encodings(entry: dict) -> list[Encoding]:
    scales = np.atleast_1d(np.asarray(entry["y_scale"], np.float64)).tolist()
    zeros = np.broadcast_to(np.asarray(entry.get("y_zero_point", 0), np.float64), (len(scales),)).tolist()
    qmin, qmax = _dtype_range(entry["output_dtype"])
    result = []
    for s, z in zip(scales, zeros, strict=True):
        if float(z).is_integer():
            result.append(Encoding(s, qmin - int(z), qmax - int(z)))
        else:  # value = (q - z) · s with a fractional z: n = q, shift = -z
            result.append(Encoding(s, qmin, qmax, -z))
    return result


def read_version(encodings: dict) -> dict[str, list[Encoding | None]]:
    """Every tensor's encodings in a JSON of any of :data:`VERSIONS`: one per channel (weights) or one
    (activations), ``None`` for a float channel. Which is which the caller knows from the model."""
    version = encodings.get("version")
    if version == "2.0.0":
        return {e["name"]: list(_v2_encodings(e)) for e in encodings["encodings"]}
    if version == "1.0.0":
        return {e["name"]: [Encoding(sc, o, o + 2 ** e["bw"] - 1)
                            for sc, o in zip(e["scale"], e["offset"], strict=True)]
                for e in encodings["activation_encodings"] + encodings["param_encodings"]}

    def entry(e: dict) -> Encoding | None:
        if e.get("dtype") != "int":
            return None
        return Encoding(e["scale"], e["offset"], e["offset"] + 2 ** e["bitwidth"] - 1)
    return {n: [entry(e) for e in es]
            for n, es in {**encodings["activation_encodings"], **encodings["param_encodings"]}.items()}

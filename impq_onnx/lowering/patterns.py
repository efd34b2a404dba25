"""The two QDQ shapes every output target rewrites, found by op type and graph structure, never by name.

In the style of the onnxscript rewriter, each pattern is a function that takes the node a match would
start from and returns either the match or a :class:`NoMatch` that says why not (the ``check``)::

    weight:      initializer(int) -> DequantizeLinear [-> Add(float initializer)] -> Conv | Gemm | MatMul (input 1)
    activation:  x [-> Clip(on the step grid)] -> QuantizeLinear -> DequantizeLinear -> consumers
    constant:    initializer(int) -> DequantizeLinear, anywhere else (a bias another tool quantized)

So a target converts a QDQ model made by any tool (onnxruntime's ``quantize_static`` included), not only
one made by :mod:`impq_onnx.lowering.passes`. A match carries what the graph says about the quantizer
(codes, scale, zero point, axis, integer range); what only the precision plan knows (the bits ``B`` of each
kernel) the targets add when they have a plan.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

__all__ = ["NoMatch", "WeightQuantizer", "ActivationQuantizer", "weight_quantizer", "activation_quantizer",
           "weight_quantizers", "activation_quantizers", "constant_dequantizers", "dequantized_constant",
           "WEIGHT_LAYERS"]

WEIGHT_LAYERS = ("Conv", "Gemm", "MatMul")
_STANDARD = ("", "ai.onnx")


@dataclasses.dataclass(frozen=True)
class NoMatch:
    """Why a node does not start a pattern (the onnxscript rewriter's ``check`` result)."""

    node: str
    reason: str

    def __bool__(self) -> bool:
        return False


@dataclasses.dataclass(frozen=True)
class WeightQuantizer:
    """``codes -> DequantizeLinear [-> Add(residual)] -> layer``: a stored weight of a Conv/Gemm/MatMul."""

    dequantize: ir.Node
    residual: ir.Node | None  # an Add of a float initializer (the project's float kernels)
    layer: ir.Node
    codes: ir.Value
    scale: ir.Value
    zero_point: ir.Value | None
    axis: int  # the DequantizeLinear axis (per-channel), normalised to >= 0

    @property
    def nodes(self) -> list[ir.Node]:
        return [self.dequantize] + ([self.residual] if self.residual is not None else [])

    @property
    def output(self) -> ir.Value:
        """The float weight the layer reads."""
        return self.nodes[-1].outputs[0]

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """``(codes, scale, zero_point, shape)``: scale and zero point reshaped to broadcast along the axis."""
        codes = self.codes.const_value.numpy()
        shape = [1] * codes.ndim
        shape[self.axis] = -1
        scale = self.scale.const_value.numpy().reshape(shape)
        zero = self.zero_point.const_value.numpy() if self.zero_point is not None else np.zeros((), codes.dtype)
        zero = zero.reshape([1] * codes.ndim if zero.size == 1 else shape)
        return codes, scale, zero, shape


@dataclasses.dataclass(frozen=True)
class ActivationQuantizer:
    """``x [-> Clip] -> QuantizeLinear -> DequantizeLinear``: one per-tensor activation quantizer."""

    input: ir.Value  # x, the float tensor quantized
    clip: ir.Node | None  # a Clip that only narrows the integer range (absorbed into the quantizer)
    quantize: ir.Node
    dequantize: ir.Node
    scale: float
    zero_point: int
    lo: int  # integer range of the quantized values (zero point included)
    hi: int
    signed: bool
    bits: int  # lo..hi is the signed or unsigned ``bits``-bit range

    @property
    def nodes(self) -> list[ir.Node]:
        return ([self.clip] if self.clip is not None else []) + [self.quantize, self.dequantize]


def _constant(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _only_use(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0][0] if len(uses) == 1 and not value.is_graph_output() else None


def _used_only_by(value: ir.Value | None, nodes: list[ir.Node]) -> bool:
    return value is None or (all(user in nodes for user, _ in value.uses()) and not value.is_graph_output())


def weight_quantizer(dq: ir.Node) -> WeightQuantizer | NoMatch:
    """Match the weight pattern starting at ``dq`` (a DequantizeLinear)."""
    if dq.op_type != "DequantizeLinear" or dq.domain not in _STANDARD:
        return NoMatch(dq.name, "not a DequantizeLinear")
    codes, scale = dq.inputs[0], dq.inputs[1]
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    stored = _constant(codes)
    if stored is None or not codes.is_initializer() or not np.issubdtype(stored.dtype, np.integer):
        return NoMatch(dq.name, "its input is not an integer initializer")
    if _constant(scale) is None or (zero is not None and _constant(zero) is None):
        return NoMatch(dq.name, "its scale or zero point is not constant")
    chain, user = [dq], _only_use(dq.outputs[0])
    if user is not None and user.op_type == "Add" and user.domain in _STANDARD:
        other = user.inputs[1] if user.inputs[0] is dq.outputs[0] else user.inputs[0]
        if _constant(other) is None or _constant(other).dtype != np.float32:
            return NoMatch(dq.name, "it is followed by an Add of something other than a float constant")
        chain.append(user)
        user = _only_use(user.outputs[0])
    if user is None or user.op_type not in WEIGHT_LAYERS or user.domain not in _STANDARD:
        return NoMatch(dq.name, f"its value does not feed exactly one {'/'.join(WEIGHT_LAYERS)}")
    if user.inputs[1] is not chain[-1].outputs[0]:
        return NoMatch(dq.name, f"it feeds {user.op_type} '{user.name}' as data, not as its weight")
    if not all(_used_only_by(v, [dq]) for v in (codes, scale, zero)):
        return NoMatch(dq.name, "its codes, scale or zero point are shared with other nodes")
    axis = dq.attributes.get_int("axis", 1) if scale.const_value.size > 1 else 0
    return WeightQuantizer(dq, chain[1] if len(chain) > 1 else None, user, codes, scale, zero,
                           axis % stored.ndim)


def _clip_range(clip: ir.Node, scale: np.float32) -> tuple[int, int] | None:
    """``(kmin, kmax)`` when the Clip's bounds are integers times ``scale`` exactly, else None."""
    bounds = [_constant(clip.inputs[i]) if len(clip.inputs) > i else None for i in (1, 2)]
    if any(b is None or b.size != 1 or b.dtype != np.float32 for b in bounds):
        return None
    ks = [np.rint(b.reshape(()) / scale) for b in bounds]
    if any(np.float32(k) * scale != b.reshape(()) for k, b in zip(ks, bounds)):
        return None
    return int(ks[0]), int(ks[1])


def _bits_of(lo: int, hi: int, signed: bool) -> int | None:
    width = (hi - lo + 1).bit_length() - 1
    if width < 1 or hi - lo + 1 != 2**width:
        return None
    return width if lo == (-(2 ** (width - 1)) if signed else 0) else None


def activation_quantizer(q: ir.Node) -> ActivationQuantizer | NoMatch:
    """Match the activation pattern starting at ``q`` (a QuantizeLinear)."""
    if q.op_type != "QuantizeLinear" or q.domain not in _STANDARD:
        return NoMatch(q.name, "not a QuantizeLinear")
    scale, zero = _constant(q.inputs[1]), _constant(q.inputs[2]) if len(q.inputs) > 2 else None
    if scale is None or zero is None or scale.size != 1 or zero.size != 1:
        return NoMatch(q.name, "its scale and zero point are not constant scalars (per-tensor)")
    dq = _only_use(q.outputs[0])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in _STANDARD:
        return NoMatch(q.name, "it is not followed by exactly one DequantizeLinear")
    if not (np.array_equal(_constant(dq.inputs[1]), scale)
            and np.array_equal(_constant(dq.inputs[2]) if len(dq.inputs) > 2 else None, zero)):
        return NoMatch(q.name, "its DequantizeLinear has another scale or zero point")
    if not all(_used_only_by(v, [q, dq]) for v in (q.inputs[2], dq.inputs[2])):
        return NoMatch(q.name, "its zero point is shared with other nodes")
    s, z, info = np.float32(scale.reshape(())), int(zero.reshape(())), np.iinfo(zero.dtype)
    lo, hi, clip = int(info.min), int(info.max), q.inputs[0].producer()
    if clip is not None and clip.op_type == "Clip" and clip.domain in _STANDARD and _only_use(clip.outputs[0]) is q:
        bounds = _clip_range(clip, s)
        narrowed = bounds and (max(lo, bounds[0] + z), min(hi, bounds[1] + z))
        if narrowed and _bits_of(*narrowed, info.min < 0) is not None:
            lo, hi = narrowed
        else:
            clip = None  # a Clip of the model itself (ReLU6, say): it stays in front of the quantizer
    else:
        clip = None
    signed = bool(info.min < 0)
    bits = _bits_of(lo, hi, signed)
    if bits is None:
        return NoMatch(q.name, f"its integer range {lo}..{hi} is not a whole number of bits")
    head = clip if clip is not None else q
    return ActivationQuantizer(head.inputs[0], clip, q, dq, float(s), z, lo, hi, signed, bits)


def weight_quantizers(graph: ir.Graph) -> list[WeightQuantizer]:
    """Every weight pattern in ``graph``, in graph order."""
    found = (weight_quantizer(node) for node in graph if node.op_type == "DequantizeLinear")
    return [m for m in found if isinstance(m, WeightQuantizer)]


def activation_quantizers(graph: ir.Graph) -> list[ActivationQuantizer]:
    """Every activation pattern in ``graph``, in graph order."""
    found = (activation_quantizer(node) for node in graph if node.op_type == "QuantizeLinear")
    return [m for m in found if isinstance(m, ActivationQuantizer)]


def dequantized_constant(dq: ir.Node) -> np.ndarray | NoMatch:
    """The float values of ``integer initializer -> DequantizeLinear`` (a bias another tool quantized, say)."""
    if dq.op_type != "DequantizeLinear" or dq.domain not in _STANDARD:
        return NoMatch(dq.name, "not a DequantizeLinear")
    codes, scale = _constant(dq.inputs[0]), _constant(dq.inputs[1])
    zero = _constant(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else np.zeros((), np.int64)
    if codes is None or scale is None or zero is None or not np.issubdtype(codes.dtype, np.integer):
        return NoMatch(dq.name, "its input, scale or zero point is not a constant integer tensor")
    shape = [1] * codes.ndim
    if scale.size > 1:
        shape[dq.attributes.get_int("axis", 1) % codes.ndim] = -1
    difference = codes.astype(np.int64) - zero.reshape(shape if zero.size > 1 else [1] * codes.ndim)
    return (difference.astype(np.float32) * scale.reshape(shape if scale.size > 1 else [1] * codes.ndim)).astype(
        np.float32)


def constant_dequantizers(graph: ir.Graph) -> list[ir.Node]:
    """Every DequantizeLinear of a constant integer tensor left in ``graph``, in graph order."""
    return [node for node in graph if node.op_type == "DequantizeLinear"
            and not isinstance(dequantized_constant(node), NoMatch)]

"""What onnxruntime computes when it fuses the ort target's QDQ graph, written as standard ONNX ops.

With graph optimizations on, onnxruntime (1.19 and mainline 1.32 alike, x86-64 CPU) replaces every
``DequantizeLinear -> op -> QuantizeLinear`` group of the ort model by one integer kernel, which
requantizes in its own arithmetic, not in the float order of the QDQ graph: the ort model then differs
from its float simulation in a few borderline codes (0.1-0.5 % of top-1 on CIFAR-10). :func:`integer_reference`
rewrites each such group of a lowered ort model into that arithmetic, exactly, with standard ops whose
results are defined to the bit (integer convolutions and matrix products, float32 and float64 products
and sums, round-half-to-even), so that the deployed model can be verified against it with nothing left
to chance. Per group, with ``q`` the stored codes, ``z`` zero points and ``s`` scales, all float32
unless said:

- **Conv / Gemm / MatMul -> QuantizeLinear** (QLinearConv, QGemm, QLinearMatMul): the accumulator
  ``acc = Σ (q_x - z_x)·q_w + q_b`` in int32 (``ConvInteger`` / ``MatMulInteger`` on the weight codes
  shifted by 128 to uint8 with zero point 128, which ``ConvInteger`` needs), then
  ``q_y = clip(round(float(acc) · M_c) + z_y)`` with ``M_c = (s_x · s_w,c) / s_y``. A ``Relu`` or ``Clip``
  (ReLU6) between the layer and its quantizer is dropped where onnxruntime drops it (its ReluQuantFusion and
  ClipQuantFusion: the quantizer's range does its work), and ops that commute with quantization (a
  ``MaxPool``, reshapes) are applied to the codes, as onnxruntime moves the quantizer in front of them.
- **Gemm with a float output** (QGemm without output quantizer): ``y = float(acc) · (s_a · s_b,c)``.
- **Add -> QuantizeLinear** (QLinearAdd, the AVX2 kernel): with ``r_a = s_a / s_y``, ``r_b = s_b / s_y``
  and ``f = z_y - (r_a·z_a + r_b·z_b)``, ``t = fma(q_b, r_b, f)``, ``q_y = clip(round(fma(q_a, r_a, t)))``;
  each fused multiply-add is a float64 product and sum (exact here: an 8-bit code times a float32)
  rounded once to float32.
- **GlobalAveragePool -> QuantizeLinear** (QLinearGlobalAveragePool): with ``n = H·W``,
  ``q_y = clip(round(float(Σ q_x - z_x·n) · (s_x / (s_y · n))) + z_y)``.

The reference is run with onnxruntime's optimizations on as well: the float ops the fused kernels leave (a
Conv without an output quantizer, an AveragePool) are then computed in the same order as in the deployed
graph, while the integer parts are exact whatever order they are summed in. Measured bit-exact against
onnxruntime 1.19.2 and 1.32.0's fused kernels on an AVX-512 x86-64 CPU (``tests/lowering/targets/
test_ort_integer.py``; ResNet-20 and MobileNet-V1 on all 10,000 CIFAR-10 test images in ``bench/deploy.py``;
the zoo's exported models).

The integer sums are exact only where the CPU's u8s8 kernels do not saturate (:mod:`~impq_onnx.lowering.targets.
ort_kernels`): on AVX2, and on AVX-512 without VNNI, MLAS adds each adjacent pair of u8·s8 products into an int16
with saturation (``vpmaddubsw``). Measured on an AMD EPYC with AVX2 only (onnxruntime 1.19.2): random codes through
QLinearConv (64 channels, 3x3, 32 images of 15x15) differ from the reference in 50,942 of 131,072 outputs with
weight codes in ±127 and 39,647 with ±96, and in none with ±65, ±64 or ±32 (±65 could, on other data); QGemm
(K = 64, 10 outputs, 256 rows) in 1,658 of 2,560 with ±127, 393 with ±96, none with ±65 or less; QLinearMatMul
(K = 96) in 12,295 of 20,480 with ±127, none with ±64; depthwise QLinearConv in none even with ±127 (its kernels
widen to int32). A numpy model that saturates every adjacent pair of the K order (kernel position outer, input
channel inner, through MLAS's ConvSym kernel and its im2col GEMM alike) gives every deployed output bit for bit
where it was run (``docs/lowering.md``).
So :func:`deployed_coverage` counts a model as covered on a CPU with VNNI (:func:`modelled_cpu`), and on one
without where no rewritten group could saturate (:func:`saturating_group`: two same-sign weight codes of an output
channel times activation code 255 within int16, so every layer of at most 7 bits); the zoo's 4-bit-weight models
match on AVX2 for that reason. ARM and SSE-only x86-64 CPUs run other kernels and are not modelled.
:func:`fused_counts` names what onnxruntime fused, so a caller can tell when a group was fused that this module
does not rewrite.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from impq_onnx.lowering.targets.ort_kernels import SATURATING, modelled_cpu, pair_overflow, u8s8_kernels

__all__ = ["integer_reference", "fused_counts", "rewritten_counts", "modelled_cpu", "saturating_group",
           "deployed_coverage", "FUSED_KERNELS", "REWRITTEN"]
_GROUPS_KEY = "impq.integer_groups"
_SATURATING_KEY = "impq.saturating_group"  # the first rewritten group whose u8s8 pairs could leave int16

# onnxruntime's fused integer kernels, and which of them integer_reference writes out.
FUSED_KERNELS = ("QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearGlobalAveragePool",
                 "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMul", "QLinearAveragePool",
                 "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean")
REWRITTEN = ("QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearGlobalAveragePool")
_F32 = np.float32
# Ops a quantizer commutes with exactly (monotone or rearranging), which onnxruntime's QDQ propagation moves the
# quantizer in front of: the integer kernel's codes go through them.
_COMMUTING = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")
_Group = tuple[list[onnx.NodeProto], list[onnx.NodeProto]]  # (integer nodes, the group's nodes they replace)


def fused_counts(optimized: onnx.ModelProto) -> Counter[str]:
    """How many of each fused integer kernel an onnxruntime-optimized model holds."""
    return Counter(n.op_type for n in optimized.graph.node if n.op_type in FUSED_KERNELS)


def rewritten_counts(reference: onnx.ModelProto) -> dict[str, int]:
    """How many groups of each kernel :func:`integer_reference` wrote out, sorted by kernel."""
    text = next((p.value for p in reference.metadata_props if p.key == _GROUPS_KEY), "")
    return dict(sorted((k, int(v)) for k, v in (item.split("=") for item in text.split(",") if item)))


def saturating_group(reference: onnx.ModelProto) -> str | None:
    """The first group :func:`integer_reference` wrote out whose u8s8 products could saturate in ``vpmaddubsw``
    (:func:`~impq_onnx.lowering.targets.ort_kernels.pair_overflow`), named with its layer; None where none could."""
    return next((p.value for p in reference.metadata_props if p.key == _SATURATING_KEY), None)


def deployed_coverage(reference: onnx.ModelProto, fused: dict[str, int], cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """None where ``reference`` (:func:`integer_reference`'s) is what onnxruntime computes on this CPU for a model
    whose optimized graph holds the ``fused`` kernels; otherwise why not, in one line."""
    rewritten = rewritten_counts(reference)
    if fused != rewritten:
        extra = ", ".join(f"{k} {v - rewritten.get(k, 0)}" for k, v in fused.items() if v > rewritten.get(k, 0))
        return f"onnxruntime fused kernels the reference does not write out ({extra or 'fewer than written'})"
    kernels = u8s8_kernels(cpuinfo)
    if kernels is None:
        return "this CPU is not x86-64 with AVX2 and FMA: the reference does not model its integer kernels"
    group = saturating_group(reference) if kernels in SATURATING else None
    if group is not None:
        return (f"this CPU's u8s8 kernels ({kernels}, without VNNI) add pairs of products with int16 saturation "
                f"(vpmaddubsw), and {group}")
    return None


class _Graph:
    """Producers, consumers and constants of a model, and the nodes that replace its fused groups."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.users[name].append(node)
        self.outputs = {o.name for o in graph.output}
        self.new_inits: list[onnx.TensorProto] = []
        self.count: Counter[str] = Counter()
        self.saturating: list[str] = []  # groups whose u8s8 products could saturate (ort_kernels.pair_overflow)

    def rewrote(self, kernel: str, node: onnx.NodeProto, codes: np.ndarray | None, x_max: int) -> None:
        """Count a group of ``kernel`` written out; ``codes``: its weight codes, output channel first (None:
        a depthwise Conv, whose kernels widen to int32 before multiplying)."""
        self.count[kernel] += 1
        overflow = None if codes is None else pair_overflow(codes, x_max)
        if overflow is not None:
            self.saturating.append(f"layer '{node.name or node.output[0]}' ({kernel}) could saturate: {overflow}")

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name)

    def value(self, name: str) -> np.ndarray:
        """A constant already found to be one."""
        return self.consts[name]

    def add_const(self, name: str, value: np.ndarray) -> str:
        self.new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def sole_user(self, tensor: str) -> onnx.NodeProto | None:
        users = self.users.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None

    def dequantized(self, tensor: str, *, constant: bool) -> tuple[str, np.ndarray, np.ndarray] | None:
        """``(codes tensor, scale, zero point)`` when ``tensor`` is a DequantizeLinear output of stored
        (``constant``) or computed codes with constant scale and zero point."""
        node = self.producer.get(tensor)
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
            return None
        scale, zero = self.const(node.input[1]), self.const(node.input[2])
        codes_const = node.input[0] in self.consts
        if scale is None or zero is None or codes_const != constant or scale.dtype != _F32:
            return None
        if not constant and (scale.size != 1 or zero.dtype not in (np.uint8, np.int8)):
            return None
        return node.input[0], scale, zero

    def requantized_by(self, node: onnx.NodeProto) -> _After | None:
        """The QuantizeLinear that alone reads ``node``'s output, through a Relu it makes redundant and any
        ops that commute with quantization (onnxruntime moves the quantizer in front of them)."""
        user = self.sole_user(node.output[0])
        absorbed, through = [], []
        if user is not None and user.op_type in ("Relu", "Clip"):
            absorbed.append(user)
            user = self.sole_user(user.output[0])
        while user is not None and user.op_type in _COMMUTING:
            through.append(user)
            user = self.sole_user(user.output[0])
        if user is None or user.op_type != "QuantizeLinear" or len(user.input) < 3:
            return None
        scale, zero = self.const(user.input[1]), self.const(user.input[2])
        if scale is None or zero is None or scale.size != 1 or zero.size != 1 or zero.dtype not in (np.uint8, np.int8):
            return None
        if absorbed and not self._redundant(absorbed[0], _F32(scale.reshape(())), zero):
            return None  # a Relu or Clip the quantizer's range does not make redundant: onnxruntime keeps it
        return _After(user, absorbed + through + [user], through)

    def _redundant(self, node: onnx.NodeProto, scale: np.float32, zero: np.ndarray) -> bool:
        """Whether onnxruntime drops ``node`` (Relu, Clip) in front of a quantizer (its ReluQuantFusion and
        ClipQuantFusion rules): a Relu when the zero point is the type's minimum, a Clip whose constant bounds
        cover the quantizer's range to within float32's epsilon."""
        info = np.iinfo(zero.dtype)
        if node.op_type == "Relu":
            return int(zero) == info.min
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bounds = [self.const(name) if name else None for name in list(node.input[1:3]) + [""] * 2][:2]
        low = bounds[0] if bounds[0] is not None else attrs.get("min")
        high = bounds[1] if bounds[1] is not None else attrs.get("max")
        if low is None or high is None:
            return False
        lower, upper = _F32(scale * _F32(info.min - int(zero))), _F32(scale * _F32(info.max - int(zero)))
        eps = np.finfo(_F32).eps
        return not (eps < _F32(_F32(low) - lower) or eps < _F32(upper - _F32(high)))


class _After:
    """What follows a fused layer up to its quantizer: ``absorbed`` (replaced nodes), ``through`` (ops that
    commute with quantization, applied to the codes instead)."""

    def __init__(self, quantizer: onnx.NodeProto, absorbed: list[onnx.NodeProto], through: list[onnx.NodeProto]):
        self.quantizer, self.absorbed, self.through = quantizer, absorbed, through

    def codes(self, prefix: str) -> str:
        """Where the group's integer nodes write the codes."""
        return prefix + "codes" if self.through else self.quantizer.output[0]

    def tail(self, prefix: str) -> list[onnx.NodeProto]:
        """The commuting ops, applied to the codes, ending in the quantizer's output."""
        nodes, current = [], self.codes(prefix)
        for i, node in enumerate(self.through):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{prefix}through{i}"
            copy.input[0] = current
            current = self.quantizer.output[0] if i == len(self.through) - 1 else f"{prefix}through{i}_out"
            del copy.output[:]
            copy.output.append(current)
            nodes.append(copy)
        return nodes


def _requantize(g: _Graph, acc: str, multiplier: str, quantizer: onnx.NodeProto, out: str,
                prefix: str) -> list[onnx.NodeProto]:
    """``out = clip(round(float(acc) · multiplier) + zero point)`` in the quantizer's type (``multiplier``: a
    float32 tensor, constant or computed)."""
    zero = g.value(quantizer.input[2])
    info = np.iinfo(zero.dtype)
    return [
        helper.make_node("Cast", [acc], [prefix + "acc_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [prefix + "acc_f", multiplier], [prefix + "scaled"]),
        helper.make_node("Round", [prefix + "scaled"], [prefix + "rounded"]),
        helper.make_node("Add", [prefix + "rounded", g.add_const(prefix + "zero", _F32(int(zero)))],
                         [prefix + "shifted"]),
        helper.make_node("Clip", [prefix + "shifted", g.add_const(prefix + "lo", _F32(info.min)),
                                  g.add_const(prefix + "hi", _F32(info.max))], [prefix + "clipped"]),
        helper.make_node("Cast", [prefix + "clipped"], [out], to=onnx.helper.np_dtype_to_tensor_dtype(zero.dtype)),
    ]


def _shifted_weight(g: _Graph, codes: np.ndarray, name: str) -> tuple[str, str]:
    """int8 codes as uint8 ``codes + 128`` with zero point 128 (``ConvInteger`` takes uint8 weights only)."""
    shifted = (codes.astype(np.int16) + 128).astype(np.uint8)
    return g.add_const(name + "/u8", shifted), g.add_const(name + "/u8_zero", np.uint8(128))


def _accumulator(g: _Graph, node: onnx.NodeProto, prefix: str):
    """Integer nodes for ``Σ (q_x - z_x)·q_w + q_b`` of a Conv / Gemm / MatMul fed by DequantizeLinears:
    ``(nodes, accumulator, s_x, per-output-channel s_w, shape of a per-channel vector, weight codes output channel
    first or None for a depthwise Conv)``, or None when the group is not one this module writes out (uint8 input
    codes and int8 weight codes, as the ort target stores)."""
    x = g.dequantized(node.input[0], constant=False)
    w = g.dequantized(node.input[1], constant=True) if len(node.input) > 1 else None
    if x is None or w is None or np.any(w[2] != 0) or x[2].dtype != np.uint8:
        return None
    x_codes, x_scale, _ = x
    x_zero_name = g.producer[node.input[0]].input[2]
    w_codes = g.value(w[0])
    if w_codes.dtype != np.int8:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        if w[1].size not in (1, w_codes.shape[0]):
            return None
        weight, weight_zero = _shifted_weight(g, w_codes, prefix + "weight")
        conv = {k: v for k, v in attrs.items() if k in ("auto_pad", "dilations", "group", "kernel_shape", "pads",
                                                         "strides")}
        nodes = [helper.make_node("ConvInteger", [x_codes, weight, x_zero_name, weight_zero], [prefix + "acc"], **conv)]
        channels = w_codes.shape[0]
        depthwise = w_codes.shape[1] == 1 and attrs.get("group", 1) == channels
        per_channel = None if depthwise else w_codes
        bias_shape = (-1, 1, 1) if len(w_codes.shape) == 4 else (-1,) + (1,) * (len(w_codes.shape) - 2)
    else:
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                                       or attrs.get("beta", 1.0) != 1.0):
            return None
        matrix = w_codes.T if node.op_type == "Gemm" and attrs.get("transB", 0) else w_codes
        if matrix.ndim != 2 or w[1].size not in (1, matrix.shape[1]):
            return None
        weight, weight_zero = _shifted_weight(g, np.ascontiguousarray(matrix), prefix + "weight")
        nodes = [helper.make_node("MatMulInteger", [x_codes, weight, x_zero_name, weight_zero], [prefix + "acc"])]
        channels, bias_shape, per_channel = matrix.shape[1], (-1,), matrix.T
    acc = prefix + "acc"
    if len(node.input) > 2 and node.input[2]:
        b = g.dequantized(node.input[2], constant=True)
        if b is None or g.value(b[0]).dtype != np.int32 or np.any(b[2] != 0):
            return None
        codes = g.value(b[0]).reshape(bias_shape)
        nodes.append(helper.make_node("Add", [acc, g.add_const(prefix + "bias", codes)], [prefix + "acc_b"]))
        acc = prefix + "acc_b"
    w_scale = np.broadcast_to(w[1].astype(_F32).reshape(-1), (channels,))
    return nodes, acc, _F32(x_scale.reshape(())), w_scale, bias_shape, per_channel


def _layer(g: _Graph, node: onnx.NodeProto) -> _Group | None:
    prefix = f"{node.output[0]}/integer/"
    found = _accumulator(g, node, prefix)
    if found is None:
        return None
    nodes, acc, x_scale, w_scale, bias_shape, codes = found
    x_max = int(np.iinfo(np.uint8).max)  # the input codes are uint8 (_accumulator)
    after = g.requantized_by(node)
    if after is not None:
        quantizer = after.quantizer
        y_scale = _F32(g.value(quantizer.input[1]).reshape(()))
        multiplier = ((x_scale * w_scale).astype(_F32) / y_scale).astype(_F32).reshape(bias_shape)
        g.rewrote("QLinearConv" if node.op_type == "Conv" else "QGemm" if node.op_type == "Gemm" else "QLinearMatMul",
                  node, codes, x_max)
        multiplier_name = g.add_const(prefix + "multiplier", multiplier)
        return (nodes + _requantize(g, acc, multiplier_name, quantizer, after.codes(prefix), prefix)
                + after.tail(prefix),
                [node, *after.absorbed])
    if node.op_type != "Gemm":
        return None
    scale = g.add_const(prefix + "scale", (x_scale * w_scale).astype(_F32))
    g.rewrote("QGemm", node, codes, x_max)
    return nodes + [helper.make_node("Cast", [acc], [prefix + "acc_f"], to=TensorProto.FLOAT),
                    helper.make_node("Mul", [prefix + "acc_f", scale], [node.output[0]])], [node]


def _add(g: _Graph, node: onnx.NodeProto) -> _Group | None:
    a, b = (g.dequantized(t, constant=False) for t in node.input[:2])
    after = g.requantized_by(node)
    if a is None or b is None or after is None or a[2].dtype != b[2].dtype:
        return None
    quantizer = after.quantizer
    y_scale, y_zero = _F32(g.value(quantizer.input[1]).reshape(())), g.value(quantizer.input[2])
    if y_zero.dtype != a[2].dtype:
        return None
    ra, rb = _F32(_F32(a[1].reshape(())) / y_scale), _F32(_F32(b[1].reshape(())) / y_scale)
    fixed = _F32(_F32(int(y_zero)) - _F32(_F32(ra * _F32(int(a[2]))) + _F32(rb * _F32(int(b[2])))))
    p = f"{quantizer.output[0]}/integer/"
    info = np.iinfo(y_zero.dtype)
    d, f = TensorProto.DOUBLE, TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", [b[0]], [p + "b"], to=d),
        helper.make_node("Mul", [p + "b", g.add_const(p + "rb", np.float64(rb))], [p + "b_scaled"]),
        helper.make_node("Add", [p + "b_scaled", g.add_const(p + "fixed", np.float64(fixed))], [p + "t64"]),
        helper.make_node("Cast", [p + "t64"], [p + "t"], to=f),
        helper.make_node("Cast", [p + "t"], [p + "t_d"], to=d),
        helper.make_node("Cast", [a[0]], [p + "a"], to=d),
        helper.make_node("Mul", [p + "a", g.add_const(p + "ra", np.float64(ra))], [p + "a_scaled"]),
        helper.make_node("Add", [p + "a_scaled", p + "t_d"], [p + "r64"]),
        helper.make_node("Cast", [p + "r64"], [p + "r"], to=f),
        helper.make_node("Round", [p + "r"], [p + "rounded"]),
        helper.make_node("Clip", [p + "rounded", g.add_const(p + "lo", _F32(info.min)),
                                  g.add_const(p + "hi", _F32(info.max))], [p + "clipped"]),
        helper.make_node("Cast", [p + "clipped"], [after.codes(p)],
                         to=onnx.helper.np_dtype_to_tensor_dtype(y_zero.dtype)),
    ]
    g.count["QLinearAdd"] += 1
    return nodes + after.tail(p), [node, *after.absorbed]


def _average_pool(g: _Graph, node: onnx.NodeProto, opset: int) -> _Group | None:
    x = g.dequantized(node.input[0], constant=False)
    after = g.requantized_by(node)
    if x is None or after is None:
        return None
    quantizer = after.quantizer
    codes, x_scale, x_zero = x
    y_scale = _F32(g.value(quantizer.input[1]).reshape(()))
    p = f"{quantizer.output[0]}/integer/"
    i32, f = TensorProto.INT32, TensorProto.FLOAT
    axes = g.add_const(p + "axes", np.array([2, 3], np.int64))
    reduce = (helper.make_node("ReduceSum", [p + "x", axes], [p + "sum"], keepdims=1) if opset >= 13 else
              helper.make_node("ReduceSum", [p + "x"], [p + "sum"], keepdims=1, axes=[2, 3]))
    nodes = [
        helper.make_node("Cast", [codes], [p + "x"], to=i32),
        reduce,
        # n = H·W of this input, as int32 and float32
        helper.make_node("Shape", [codes], [p + "shape"]),
        helper.make_node("Slice", [p + "shape", g.add_const(p + "from", np.array([2], np.int64)),
                                   g.add_const(p + "to", np.array([4], np.int64))], [p + "hw"]),
        helper.make_node("ReduceProd", [p + "hw"], [p + "n64"], keepdims=0),
        helper.make_node("Cast", [p + "n64"], [p + "n"], to=i32),
        helper.make_node("Cast", [p + "n64"], [p + "n_f"], to=f),
        helper.make_node("Mul", [p + "n", g.add_const(p + "x_zero", np.int32(int(x_zero)))], [p + "offset"]),
        helper.make_node("Sub", [p + "sum", p + "offset"], [p + "acc"]),
        helper.make_node("Mul", [g.add_const(p + "y_scale", y_scale), p + "n_f"], [p + "denominator"]),
        helper.make_node("Div", [g.add_const(p + "x_scale", _F32(x_scale.reshape(()))), p + "denominator"],
                         [p + "multiplier_dyn"]),
    ]
    g.count["QLinearGlobalAveragePool"] += 1
    return (nodes + _requantize(g, p + "acc", p + "multiplier_dyn", quantizer, after.codes(p), p) + after.tail(p),
            [node, *after.absorbed])


def integer_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (a lowered ort model) with every group onnxruntime fuses into an integer kernel written
    out in that kernel's arithmetic (module docstring). The result's ``metadata_props`` entry
    ``impq.integer_groups`` counts the groups rewritten per kernel (:func:`rewritten_counts`)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset < 11:
        raise ValueError(f"the ort model's opset {opset} is below 11 (Round, Clip with inputs)")
    g = _Graph(model)
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id of the group's last node -> its integer nodes
    dropped: set[int] = set()
    for node in model.graph.node:
        if id(node) in dropped:
            continue
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            found = _layer(g, node)
        elif node.op_type == "Add" and len(node.input) == 2:
            found = _add(g, node)
        elif node.op_type == "GlobalAveragePool":
            found = _average_pool(g, node, opset)
        else:
            found = None
        if found is None:
            continue
        nodes, group = found
        dropped.update(id(n) for n in group)
        replaced[id(group[-1])] = nodes
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    for node in model.graph.node:
        if id(node) in replaced:
            out.graph.node.extend(replaced[id(node)])
        elif id(node) not in dropped:
            out.graph.node.append(node)
    out.graph.initializer.extend(g.new_inits)
    _prune(out)
    entry = out.metadata_props.add()
    entry.key, entry.value = _GROUPS_KEY, ",".join(f"{k}={v}" for k, v in sorted(g.count.items()))
    if g.saturating:
        entry = out.metadata_props.add()
        entry.key, entry.value = _SATURATING_KEY, g.saturating[0]
    return out


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nothing reads, then initializers no node reads."""
    graph = model.graph
    wanted = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in wanted for o in node.output):
            keep.append(node)
            wanted.update(i for i in node.input if i)
    kept = list(reversed(keep))
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)

"""``Conv`` (plain, grouped, depthwise; 1-D and 2-D for the per-sample gradients) as a layer op.

Kernels lie on weight axis 0 (``W[K, C/group, kh, kw]``: one kernel per output channel); a kernel's
dot product has ``C/group * kh * kw`` terms, one per output element.

Per-sample weight gradient: ``dW_n[k, c, i, j] = sum_p dy_n[k, p] * xpad_n[c, p*stride + (i, j)*dilation]``,
computed one kernel offset ``(i, j)`` at a time in numpy (one batched matmul of ``[Kg, P] x [P, Cg]``
per sample and group), so memory stays at one shifted copy of the input; depthwise convs reduce to an
elementwise product. Measured on ResNet-20 shapes (2 cores): ~2.5-3 ms per sample, where a
materialised im2col with numpy ``matmul`` on a transposed view took 20x longer and the "grouped conv
with the batch as groups" formulation in onnxruntime 4x longer. The same sums are written as onnx
nodes for the gradient graph (:func:`emit_conv_square_norms`: per offset a ``Slice`` of the padded
channels-last input and one batched ``MatMul``). :func:`conv_square_norms` and
:func:`emit_conv_square_norms` keep either weight axis 0 or 1, so ``ConvTranspose`` (whose weight
gradient is this one with ``x`` and ``dy`` swapped) uses them too.

Gradient graph: convs with ``auto_pad`` get explicit ``pads`` first (onnxruntime-training 1.19's
``ConvGrad`` computes wrong gradients for ``auto_pad`` convs; the forward is right; measured on a
stride-2 ``SAME_UPPER`` depthwise conv), and a ``ConvGrad`` that computes only the input gradient
becomes a ``Conv`` with the flipped, transposed weight (stride 1, plain or depthwise) or the equivalent
``ConvTranspose`` (:func:`conv_grad_as_transpose`). Not in training graphs: there the weight is an input
that changes every step, so onnxruntime cannot pre-pack it for its NCHWc kernels, and a split
``ConvGrad`` measured the same (within 4 %) as the whole one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from impq_onnx.errors import ModelError
from impq_onnx.frontend.ops.base import LayerGeometry, LayerOp, LayerShape, NormEmitter, proto_attributes

__all__ = ["ConvOp", "ConvGeometry", "conv_square_norms", "emit_conv_square_norms", "conv_grad_as_transpose"]


@dataclasses.dataclass(frozen=True)
class ConvGeometry(LayerGeometry):
    group: int = 1
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begin..., end...; empty: derive from auto_pad
    auto_pad: str = "NOTSET"


def conv_geometry(node: onnx.NodeProto, weight_shape: Sequence[int], kernel_axis: int) -> ConvGeometry:
    """The geometry of a Conv or ConvTranspose node (they share the attribute names)."""
    attrs = proto_attributes(node)
    spatial = len(weight_shape) - 2
    return ConvGeometry(node.op_type, tuple(weight_shape), kernel_axis, int(attrs.get("group", 1)),
                        tuple(attrs.get("strides", [1] * spatial)), tuple(attrs.get("dilations", [1] * spatial)),
                        tuple(attrs.get("pads", [])), auto_pad(node))


def auto_pad(node: onnx.NodeProto) -> str:
    for a in node.attribute:
        if a.name == "auto_pad":
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else str(value)
    return "NOTSET"


class ConvOp(LayerOp):
    op_type = "Conv"
    bias_input = 2
    reads_batchnorm_after = True
    float_bias_after_dequantize = True

    def analyse(self, node: ir.Node, weight_shape: tuple[int, ...], in_shape: tuple[int, ...] | None,
                out_shape: tuple[int, ...]) -> LayerShape | None:
        groups = int(node.attributes["group"].value) if "group" in node.attributes else 1
        dot = int(np.prod(weight_shape[1:]))
        bias = node.inputs[2].name if len(node.inputs) > 2 and node.inputs[2] is not None else None
        return LayerShape(kernel_axis=0, kernels=weight_shape[0], groups=groups, dot_length=dot,
                          macs=int(math.prod(out_shape[1:]) * dot), bias=bias, output=node.outputs[0].name)

    def needs_explicit_pads(self, node: onnx.NodeProto) -> bool:
        return auto_pad(node) not in ("", "NOTSET")

    def make_pads_explicit(self, node: onnx.NodeProto, shapes: dict[str, list[int | None]],
                           weights: dict[str, tuple[int, ...]]) -> None:
        attrs = proto_attributes(node)
        size = shapes.get(node.input[0], [None])[2:]
        kernel = attrs.get("kernel_shape") or list(weights.get(node.input[1], ()))[2:]
        if not size or None in size or not kernel:
            raise ModelError(f"conv '{node.name}' uses auto_pad and its input size is unknown; "
                             "pass a concrete input shape")
        strides = attrs.get("strides", [1] * len(size))
        dilations = attrs.get("dilations", [1] * len(size))
        mode = auto_pad(node)
        begin, end = [], []
        for n, k, st, dl in zip(size, kernel, strides, dilations):
            if mode == "VALID":
                begin.append(0)
                end.append(0)
                continue
            out = -(-n // st)
            total = max((out - 1) * st + (k - 1) * dl + 1 - n, 0)
            low = total // 2 if mode == "SAME_UPPER" else total - total // 2
            begin.append(low)
            end.append(total - low)
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(helper.make_attribute("pads", begin + end))

    def speed_up_gradients(self, grad_model: onnx.ModelProto, shapes: dict[str, list[int | None]]) -> int:
        return conv_grad_as_transpose(grad_model, shapes)

    def geometry(self, node: onnx.NodeProto, weight_shape: Sequence[int], kernel_axis: int) -> LayerGeometry:
        return conv_geometry(node, weight_shape, kernel_axis)

    def kernel_square_norms(self, geometry: LayerGeometry, x: np.ndarray, dy: np.ndarray) -> np.ndarray:
        assert isinstance(geometry, ConvGeometry)
        return conv_square_norms(geometry, x, dy)

    def emit_kernel_square_norms(self, norms: NormEmitter, geometry: LayerGeometry, x: str, dy: str,
                                 output: str) -> str:
        assert isinstance(geometry, ConvGeometry)
        return emit_conv_square_norms(norms, geometry, x, dy, output)


def _conv_pads(geometry: ConvGeometry, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[int]:
    spatial = len(in_shape)
    kernel = geometry.weight_shape[2:]
    if geometry.auto_pad in ("NOTSET", "") and geometry.pads:
        return list(geometry.pads)
    if geometry.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, out, k, s, d in zip(in_shape, out_shape, kernel, geometry.strides, geometry.dilations):
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            low = total // 2 if geometry.auto_pad == "SAME_UPPER" else total - total // 2
            begin.append(low)
            end.append(total - low)
        return begin + end
    return [0] * (2 * spatial)


def conv_square_norms(geometry: ConvGeometry, x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """``[N, weight_shape[kernel_axis]]`` for the conv ``x -> dy`` with weight ``W[K, Cg, kh, kw]``
    (``kernel_axis`` 0 or 1), from ``dW_n[k, c, i, j]`` as in the module docstring."""
    if x.ndim == 3:  # Conv1d: add a unit height axis
        geometry = dataclasses.replace(
            geometry,
            weight_shape=geometry.weight_shape[:2] + (1,) + geometry.weight_shape[2:],
            strides=(1,) + tuple(geometry.strides), dilations=(1,) + tuple(geometry.dilations),
            pads=(0, geometry.pads[0], 0, geometry.pads[1]) if geometry.pads else (),
        )
        x, dy = x[:, :, None, :], dy[:, :, None, :]
    if x.ndim != 4:
        raise ModelError(f"per-sample conv weight gradients support 1-D and 2-D convs, not {x.ndim - 2}-D")
    n, c, _, _ = x.shape
    k_out, c_group, kh, kw = geometry.weight_shape
    g = geometry.group
    k_group = k_out // g
    ho, wo = dy.shape[2:]
    sh, sw = geometry.strides
    dh, dw = geometry.dilations
    top, left, bottom, right = _conv_pads(geometry, x.shape[2:], (ho, wo))
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right))) if top or left or bottom or right else x
    d = np.ascontiguousarray(dy, np.float32).reshape(n, g, k_group, ho * wo)
    depthwise = c_group == 1 and k_group == 1
    grad = np.empty((n, g, k_group, c_group, kh * kw), np.float32)
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dh, j * dw
            shifted = xp[:, :, r0 : r0 + sh * (ho - 1) + 1 : sh, c0 : c0 + sw * (wo - 1) + 1 : sw]
            shifted = np.ascontiguousarray(shifted, np.float32).reshape(n, g, c_group, ho * wo)
            if depthwise:
                grad[:, :, 0, 0, i * kw + j] = np.einsum("ngp,ngp->ng", d[:, :, 0], shifted[:, :, 0])
            else:
                np.matmul(d, shifted.transpose(0, 1, 3, 2), out=grad[..., i * kw + j])
    if geometry.kernel_axis == 1:  # the kernel c of W[:, c] collects the c-th channel of every group
        return np.einsum("ngkcp,ngkcp->nc", grad, grad, dtype=np.float64)
    grad = grad.reshape(n, k_out, c_group * kh * kw)
    return np.einsum("nkc,nkc->nk", grad, grad, dtype=np.float64)


def emit_conv_square_norms(norms: NormEmitter, geometry: ConvGeometry, x: str, dy: str, output: str) -> str:
    """:func:`conv_square_norms` summed over the batch, as nodes of the gradient graph.

    Per kernel offset a ``Slice`` of the padded input (channels last) and a batched ``MatMul`` (a
    depthwise conv: ``Mul`` + ``ReduceSum``). The slice ends are constants when ``norms`` knows the
    output size (half the nodes: a session on the graph opens about twice as fast), else computed from
    ``dy``'s shape at run time. (One ``MatMul`` on the offsets' slices concatenated into an im2col matrix
    has a fifth of the nodes but measured 1.2x the CPU time on ResNet-20: ``Concat`` and the wider
    ``MatMul`` cost more than the nodes save.)
    """
    k_out, c_group, kh, kw = geometry.weight_shape
    if len(geometry.weight_shape) != 4 or geometry.auto_pad not in ("NOTSET", ""):
        raise ModelError("the graph form of per-sample conv gradients needs a 2-D conv with explicit pads")
    g = geometry.group
    k_group = k_out // g
    keep_in = geometry.kernel_axis == 1  # keep W's axis 1: sum over axis 0 (and the groups) instead
    sh, sw = geometry.strides
    dh, dw = geometry.dilations
    top, left, bottom, right = geometry.pads or (0, 0, 0, 0)
    xp = norms.op("Pad", [x, norms.const([0, 0, top, left, 0, 0, bottom, right])]) if any(
        (top, left, bottom, right)) else x
    depthwise = c_group == 1 and k_group == 1
    if not depthwise:
        xp = norms.op("Transpose", [xp], perm=[0, 2, 3, 1])  # channels last: a slice is [N, Ho, Wo, C]
        d = norms.op("Reshape", [dy, norms.const([0, k_out, -1] if g == 1 else [0, g, k_group, -1])])
    ends = _slice_ends(norms, geometry, dy)
    axes = norms.const([2, 3] if depthwise else [1, 2])
    steps = norms.const([sh, sw])
    terms = []
    for i, j in ((i, j) for i in range(kh) for j in range(kw)):  # each slice is consumed before the next is made
        part = norms.op("Slice", [xp, norms.const([i * dh, j * dw]), ends(i * dh, j * dw), axes, steps])
        if depthwise:
            grad = norms.op("ReduceSum", [norms.op("Mul", [dy, part]), norms.const([2, 3])], keepdims=0)
            square = norms.op("Mul", [grad, grad])  # [N, C]
            terms.append(norms.op("ReduceSum", [square, norms.const([1])], keepdims=1) if keep_in else square)
            continue
        if g == 1:  # [N, K, P] x [N, P, C]: no per-offset transpose
            grad = norms.op("MatMul", [d, norms.op("Reshape", [part, norms.const([0, -1, c_group])])])
            terms.append(norms.op("ReduceSum", [norms.op("Mul", [grad, grad]), norms.const([1 if keep_in else 2])],
                                  keepdims=0))
            continue
        cols = norms.op("Reshape", [part, norms.const([0, -1, g, c_group])])
        cols = norms.op("Transpose", [cols], perm=[0, 2, 1, 3])  # [N, g, P, Cg]
        grad = norms.op("MatMul", [d, cols])  # [N, g, Kg, Cg]
        terms.append(norms.op("ReduceSum", [norms.op("Mul", [grad, grad]), norms.const([1, 2] if keep_in else [3])],
                              keepdims=0))
    total = norms.op("Sum", terms) if len(terms) > 1 else terms[0]
    return norms.op("Reshape", [norms.op("ReduceSum", [total, norms.const([0])], keepdims=0), norms.const([-1])],
                    output)


def _slice_ends(norms: NormEmitter, geometry: ConvGeometry, dy: str):
    """``ends(row_offset, col_offset)``: the end indices of the strided input slice for one kernel offset."""
    sh, sw = geometry.strides
    out = norms.shape(dy)
    if out is not None and len(out) == 4 and out[2] is not None and out[3] is not None:
        ho, wo = out[2], out[3]
        return lambda r, c: norms.const([r + sh * (ho - 1) + 1, c + sw * (wo - 1) + 1])
    # the output size is known only at run time: take it from dy
    shape = norms.op("Shape", [dy])
    sizes = [norms.op("Gather", [shape, norms.const(axis)]) for axis in (2, 3)]
    spans = [norms.op("Add", [norms.op("Mul", [norms.op("Sub", [o, norms.const(1)]), norms.const(s)]),
                              norms.const(1)]) for o, s in zip(sizes, (sh, sw))]
    span = norms.op("Concat", [norms.op("Unsqueeze", [v, norms.const([0])]) for v in spans], axis=0)
    return lambda r, c: norms.op("Add", [span, norms.const([r, c])])


def conv_grad_as_transpose(grad_model: onnx.ModelProto, shapes: dict[str, list[int | None]]) -> int:
    """Replace each ``ConvGrad`` that only computes the input gradient by a cheaper equivalent.

    Stride 1, plain or depthwise: a ``Conv`` of the output gradient with the weight transposed (channel
    axes swapped) and flipped in space, padded by ``span - 1 - pad`` (2.3x faster than ``ConvTranspose``
    on ResNet-20's layers: onnxruntime runs ``Conv`` on its NCHWc kernels, ``ConvTranspose`` as a GEMM
    plus col2im). Otherwise the equivalent ``ConvTranspose`` (onnxruntime-training's ``ConvGrad`` takes
    ~1.4x its time for the same input gradient, ResNet-20 layer1 shapes, 2 threads). The sensitivity
    needs no weight gradients from onnxruntime. ``shapes`` maps forward tensors to their shapes; convs
    whose input or weight shape is unknown keep their ``ConvGrad``. Returns the number of nodes replaced.
    """
    replaced = 0
    nodes: list[onnx.NodeProto] = []
    for node in grad_model.graph.node:
        nodes.append(node)
        if node.op_type != "ConvGrad" or any(out for out in node.output[1:]):
            continue
        attrs = proto_attributes(node)
        size = shapes.get(node.input[1], [])[2:]
        weight = shapes.get(node.input[2], [])
        kernel = attrs.get("kernel_shape") or weight[2:]
        if not size or None in size or not kernel or None in kernel or len(size) != len(kernel):
            continue
        spatial = len(size)
        strides = list(attrs.get("strides") or [1] * spatial)
        dilations = list(attrs.get("dilations") or [1] * spatial)
        pads = list(attrs.get("pads") or [0] * 2 * spatial)
        group = int(attrs.get("group", 1))
        spans = [(k - 1) * dl + 1 for k, dl in zip(kernel, dilations)]
        extra = []
        for i, (n, st, span) in enumerate(zip(size, strides, spans)):
            out = (n + pads[i] + pads[i + spatial] - span) // st + 1
            extra.append(n - (st * (out - 1) + span - pads[i] - pads[i + spatial]))
        if any(e < 0 or e >= max(st, dl) for e, st, dl in zip(extra, strides, dilations)):
            continue
        # stride 1, plain or depthwise: the Conv (a strided conv's input gradient needs a zero-dilated output
        # gradient, a grouped conv's weight a transpose per group)
        conv_pads = [span - 1 - p for span, p in zip(spans * 2, pads)]
        depthwise = len(weight) == 2 + spatial and weight[1] == 1 and group == weight[0]
        if set(strides) == {1} and min(conv_pads) >= 0 and (group == 1 or depthwise) \
                and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"):
            nodes[-1:] = _input_gradient_as_conv(grad_model.graph, node, spatial, group, dilations, list(kernel),
                                                 conv_pads)
        else:
            transpose = helper.make_node("ConvTranspose", [node.input[0], node.input[2]], [node.output[0]],
                                         name=f"{node.name}/as_ConvTranspose", strides=strides,
                                         dilations=dilations, pads=pads, group=group, kernel_shape=list(kernel),
                                         output_padding=extra)
            nodes[-1] = transpose
        replaced += 1
    del grad_model.graph.node[:]
    grad_model.graph.node.extend(nodes)
    return replaced


def _input_gradient_as_conv(graph: onnx.GraphProto, node: onnx.NodeProto, spatial: int, group: int,
                            dilations: list[int], kernel: list[int], pads: list[int]) -> list[onnx.NodeProto]:
    """``dx = Conv(dy, flip(W^T))`` for a stride-1 conv (``W^T``: channel axes swapped; depthwise: ``W``)."""
    prefix = f"{node.name}/as_Conv"
    axes = list(range(2, 2 + spatial))
    constants = {"starts": [-1] * spatial, "ends": [-(2**63)] * spatial, "axes": axes, "steps": [-1] * spatial}
    for key, values in constants.items():
        graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(values, np.int64), f"{prefix}/{key}"))
    made = []
    weight = node.input[2]
    if group == 1:
        made.append(helper.make_node("Transpose", [weight], [f"{prefix}/wT"], name=f"{prefix}/transpose",
                                     perm=[1, 0, *axes]))
        weight = f"{prefix}/wT"
    made.append(helper.make_node("Slice", [weight, *(f"{prefix}/{key}" for key in constants)], [f"{prefix}/w"],
                                 name=f"{prefix}/flip"))
    made.append(helper.make_node("Conv", [node.input[0], f"{prefix}/w"], [node.output[0]], name=prefix,
                                 dilations=dilations, pads=pads, group=group, kernel_shape=kernel,
                                 strides=[1] * spatial))
    return made

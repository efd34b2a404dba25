"""``ConvTranspose`` (``W[C_in, C_out/group, kh, kw]``) as a layer op.

Kernels: output channel ``o = gi * C_out/group + j`` of group ``gi`` reads
``W[gi * C_in/group : (gi+1) * C_in/group, j]``, which is one weight slice only when ``group == 1``
(axis 1: kernel ``j`` is output channel ``j``) or for a depthwise layer (``W[C, 1]`` with
``group == C``: axis 0, kernel ``c`` is output channel ``c``). For other grouped layers the kernel
axis is 1 and kernel ``j`` covers output channel ``j`` of every group (``group`` channels).

Cost: every input element meets every weight of its group, so MACs per sample are
``H_in * W_in * W.size`` (the usual count, products that fall into the cropped ``pads`` included);
the dot length is the average number of terms of one output away from the borders,
``C_in/group * kh * kw / (stride_h * stride_w)``.

Per-sample weight gradient: ``dW_n[c, j, i] = sum_p x_n[c, p] * dypad_n[j, p*stride + i*dilation]``
(``dypad``: the output gradient padded back by ``pads``), which is the weight gradient of the Conv
``dy -> x`` with the same weight layout, strides, dilations, pads and group; :mod:`.conv` computes it
with the roles swapped. ``auto_pad`` and ``output_shape`` layers are analysed but refused by the
sensitivity (their implied pads are not derived here; re-export with explicit ``pads``).

Gradient graph: onnxruntime-training 1.19.2 builds a ``ConvTransposeGrad`` node but its CPU build has
no kernel for it ("Could not find an implementation for ConvTransposeGrad(1)"), so
:func:`conv_transpose_grad_as_standard_ops` replaces it: ``dX = Conv(dY, W)`` (the adjoint, same
attributes), ``dW`` per group as a Conv of the batch-transposed ``dY`` with the batch-transposed
``X`` as its weight (strides and dilations swapped), ``dB = ReduceSum(dY)`` over all but the channels.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from impq_onnx.errors import ModelError
from impq_onnx.frontend.ops.base import LayerGeometry, LayerOp, LayerShape, NormEmitter, proto_attributes
from impq_onnx.frontend.ops.conv import ConvGeometry, auto_pad, conv_geometry, conv_square_norms, emit_conv_square_norms

__all__ = ["ConvTransposeOp", "conv_transpose_grad_as_standard_ops"]


def _attribute(node: ir.Node, name: str, default: Any) -> Any:
    return node.attributes[name].value if name in node.attributes else default


class ConvTransposeOp(LayerOp):
    op_type = "ConvTranspose"
    bias_input = 2
    reads_batchnorm_after = True
    float_bias_after_dequantize = True

    def analyse(self, node: ir.Node, weight_shape: tuple[int, ...], in_shape: tuple[int, ...] | None,
                out_shape: tuple[int, ...]) -> LayerShape | None:
        if len(weight_shape) < 3 or in_shape is None:
            return None
        groups = int(_attribute(node, "group", 1))
        depthwise = groups > 1 and weight_shape[0] == groups and weight_shape[1] == 1
        axis = 0 if depthwise else 1
        strides = [int(s) for s in _attribute(node, "strides", [1] * (len(weight_shape) - 2))]
        dot = max(1, weight_shape[0] // groups * math.prod(weight_shape[2:]) // math.prod(strides))
        bias = node.inputs[2].name if len(node.inputs) > 2 and node.inputs[2] is not None else None
        return LayerShape(kernel_axis=axis, kernels=weight_shape[axis], groups=groups, dot_length=int(dot),
                          macs=int(math.prod(in_shape[2:]) * math.prod(weight_shape)), bias=bias,
                          output=node.outputs[0].name)

    def make_gradients_runnable(self, grad_model: onnx.ModelProto, shapes: dict[str, list[int | None]]) -> int:
        return conv_transpose_grad_as_standard_ops(grad_model, shapes)

    def geometry(self, node: onnx.NodeProto, weight_shape: Sequence[int], kernel_axis: int) -> LayerGeometry:
        if auto_pad(node) not in ("", "NOTSET") or "output_shape" in proto_attributes(node):
            raise ModelError(f"layer '{node.name}': the sensitivity needs a ConvTranspose with explicit pads, "
                             "not auto_pad or output_shape; re-export it with pads")
        return conv_geometry(node, weight_shape, kernel_axis)

    def kernel_square_norms(self, geometry: LayerGeometry, x: np.ndarray, dy: np.ndarray) -> np.ndarray:
        assert isinstance(geometry, ConvGeometry)
        return conv_square_norms(geometry, dy, x)

    def emit_kernel_square_norms(self, norms: NormEmitter, geometry: LayerGeometry, x: str, dy: str,
                                 output: str) -> str:
        assert isinstance(geometry, ConvGeometry)
        return emit_conv_square_norms(norms, geometry, dy, x, output)


def conv_transpose_grad_as_standard_ops(grad_model: onnx.ModelProto, shapes: dict[str, list[int | None]]) -> int:
    """Replace (in place) each ``ConvTransposeGrad(dY, X, W) -> dX, dW, dB`` by standard ops; returns the count."""
    graph = grad_model.graph
    known = {i.name: len(i.type.tensor_type.shape.dim) for i in list(graph.input) + list(graph.value_info)
             if i.type.tensor_type.HasField("shape")}
    known.update({t.name: len(t.dims) for t in graph.initializer})
    known.update({name: len(shape) for name, shape in shapes.items()})
    opset = next((e.version for e in grad_model.opset_import if e.domain in ("", "ai.onnx")), 13)
    nodes: list[onnx.NodeProto] = []
    replaced = 0
    for node in graph.node:
        if node.op_type != "ConvTransposeGrad":
            nodes.append(node)
            continue
        nodes.extend(_standard_grad(graph, node, known, opset))
        replaced += 1
    if replaced:
        del graph.node[:]
        graph.node.extend(nodes)
    return replaced


def _standard_grad(graph: onnx.GraphProto, node: onnx.NodeProto, ranks: dict[str, int],
                   opset: int) -> list[onnx.NodeProto]:
    attrs = proto_attributes(node)
    dy, x, w = node.input[:3]
    outputs = list(node.output) + [""] * (3 - len(node.output))
    spatial = _spatial_rank(attrs, [ranks.get(t) for t in (w, x, dy)])
    if spatial is None or auto_pad(node) not in ("", "NOTSET") or attrs.get("output_shape"):
        raise ModelError(f"ConvTranspose '{node.name}': onnxruntime has no CPU kernel for its gradient, and it "
                         "can be replaced only for explicit pads and a known rank; re-export the layer with pads")
    rank = spatial + 2
    strides = list(attrs.get("strides") or [1] * spatial)
    dilations = list(attrs.get("dilations") or [1] * spatial)
    pads = list(attrs.get("pads") or [0] * 2 * spatial)
    extra = list(attrs.get("output_padding") or [0] * spatial)
    group = int(attrs.get("group", 1))
    base = f"{node.name}/standard"
    made: list[onnx.NodeProto] = []
    ids = itertools.count(1)

    def op(op_type: str, inputs: list[str], output: str | None = None, **kw: Any) -> str:
        name = f"{base}/{op_type}_{next(ids)}"
        made.append(helper.make_node(op_type, inputs, [output or name], name=name, **kw))
        return output or name

    def const(values: list[int]) -> str:
        name = f"{base}/c_{next(ids)}"
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def crop(value: str, like: str, output: str) -> str:  # keep the spatial size of ``like``
        ends = op("Slice", [op("Shape", [like]), const([2]), const([rank])])
        return op("Slice", [value, const([0] * spatial), ends, const(list(range(2, rank)))], output)

    if outputs[0]:
        wide = any(e >= s for e, s in zip(extra, strides))
        dx = op("Conv", [dy, w], None if wide else outputs[0], strides=strides, dilations=dilations, pads=pads,
                group=group)
        if wide:
            crop(dx, x, outputs[0])
    if outputs[1]:
        perm = [1, 0] + list(range(2, rank))
        wide = any(e >= d for e, d in zip(extra, dilations))
        x_parts = [x] if group == 1 else _split(made, x, group, f"{base}/x", opset)
        dy_parts = [dy] if group == 1 else _split(made, dy, group, f"{base}/dy", opset)
        parts = []
        for xg, dyg in zip(x_parts, dy_parts):
            grad = op("Conv", [op("Transpose", [dyg], perm=perm), op("Transpose", [xg], perm=perm)],
                      strides=dilations, dilations=strides, pads=pads)  # [C_out/g, C_in/g, k...]
            if wide:
                grad = crop(grad, w, f"{grad}/cropped")
            parts.append(op("Transpose", [grad], None if group > 1 else outputs[1], perm=perm))
        if group > 1:
            op("Concat", parts, outputs[1], axis=0)
    if outputs[2]:
        op("ReduceSum", [dy, const([0] + list(range(2, rank)))], outputs[2], keepdims=0)
    return made


def _spatial_rank(attrs: dict[str, Any], ranks: list[int | None]) -> int | None:
    for name in ("strides", "dilations", "output_padding", "kernel_shape"):
        if attrs.get(name):
            return len(attrs[name])
    if attrs.get("pads"):
        return len(attrs["pads"]) // 2
    return next((r - 2 for r in ranks if r), None)


def _split(made: list[onnx.NodeProto], value: str, parts: int, prefix: str, opset: int) -> list[str]:
    """``value`` cut into ``parts`` equal pieces along the channels."""
    names = [f"{prefix}/part_{i}" for i in range(parts)]
    count = {"num_outputs": parts} if opset >= 18 else {}  # before opset 18 Split cuts equally by itself
    made.append(helper.make_node("Split", [value], names, name=f"{prefix}/Split", axis=1, **count))
    return names

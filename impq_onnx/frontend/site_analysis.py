"""``find_sites``: the analysis that fills a :class:`~impq_onnx.frontend.sites.SiteTable`.

Shapes come from ONNX shape inference on a copy of the model with a concrete input shape, so
dynamic height/width models and channels-last inputs (a Transpose inside) get MACs for the size
the user states. Nothing here edits the model.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx
import onnx_ir as ir

from impq_onnx.errors import ModelError
from impq_onnx.frontend.ops import LAYER_OPS, layer_op
from impq_onnx.frontend.ops.base import const_array
from impq_onnx.frontend.sites import ActivationSite, BatchNormStats, FloatLayer, QuantLayer, SiteTable

__all__ = ["find_sites", "analyse", "concrete_input_shape", "DEFAULT_IMAGE_SIZE"]

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 224
# Ops through which a BatchNormalization still "produces" an activation for the clip rule, and
# through which non-negativity survives.
_PASS_THROUGH = {"Relu", "Clip", "Identity", "MaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze",
                 "Transpose", "Dropout", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Pad"}
_NON_NEGATIVE = {"Relu", "Sigmoid", "Softmax", "HardSigmoid", "Abs", "Exp"}
_FLOAT = ir.DataType.FLOAT


def concrete_input_shape(canonical, input_shape=None) -> tuple[int, ...]:
    """The per-sample input shape (batch 1) the MACs are computed for."""
    declared = canonical.input_shape()
    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != len(declared):
            raise ModelError(
                f"{canonical.label}: --input-shape {','.join(map(str, shape))} has {len(shape)} dimensions, "
                f"the input '{canonical.input_name}' has {len(declared)} ({_fmt(declared)})"
            )
        for i, (given, fixed) in enumerate(zip(shape[1:], declared[1:]), start=1):
            if isinstance(fixed, int) and fixed != given:
                raise ModelError(
                    f"{canonical.label}: --input-shape dimension {i} is {given}, but input "
                    f"'{canonical.input_name}' fixes it to {fixed} ({_fmt(declared)})"
                )
        return (1,) + shape[1:]
    channel_axis = 3 if canonical.input_layout == "NHWC" else 1
    shape = [1]
    for i, d in enumerate(declared[1:], start=1):
        shape.append(d if isinstance(d, int) else (3 if i == channel_axis else DEFAULT_IMAGE_SIZE))
    guessed = [i for i, d in enumerate(declared[1:], start=1) if not isinstance(d, int) and i != channel_axis]
    if guessed:
        logger.warning("%s: input '%s' %s has a dynamic size; MACs and padding are computed for %s (a guess): "
                       "pass --input-shape", canonical.label, canonical.input_name, _fmt(declared), _fmt(shape))
    return tuple(shape)


def _fmt(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _shapes(canonical, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    proto = canonical.to_proto()
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    for dim, size in zip(dims, shape):
        dim.Clear()
        dim.dim_value = size
    del proto.graph.value_info[:]
    for out in proto.graph.output:
        out.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ModelError(
            f"{canonical.label}: the model cannot take input shape {_fmt(shape)} ({exc}); pass --input-shape"
        ) from exc
    result = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        t = info.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            result[info.name] = tuple(d.dim_value for d in t.shape.dim)
    return result


def _measured_shapes(canonical, shape: tuple[int, ...], names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes ONNX inference could not derive (e.g. Shape->Slice->Concat->Reshape chains), by
    running the model once on zeros with those tensors exposed as outputs."""
    from impq_onnx.runtime import inference_session

    proto = canonical.to_proto()
    known = {o.name for o in proto.graph.output}
    for name in names:
        if name not in known:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    try:
        session = inference_session(proto.SerializeToString(), threads=1)
        values = session.run(names, {canonical.input_name: np.zeros(shape, np.float32)})
    except Exception as exc:
        raise ModelError(f"{canonical.label}: the model does not run on input shape {_fmt(shape)} ({exc}); "
                         "pass --input-shape") from exc
    return {name: tuple(v.shape) for name, v in zip(names, values)}


def _follow_batchnorm(value: ir.Value) -> BatchNormStats | None:
    """The BatchNormalization that alone consumes ``value`` (a conv output), if any."""
    consumers = list(value.consumers())
    if len(consumers) != 1 or consumers[0].op_type != "BatchNormalization":
        return None
    return _bn_stats(consumers[0])


def _bn_stats(node: ir.Node) -> BatchNormStats | None:
    gamma, beta = const_array(node.inputs[1]), const_array(node.inputs[2])
    if gamma is None or beta is None:
        return None
    return BatchNormStats(node.name, tuple(float(g) for g in gamma.ravel()), tuple(float(b) for b in beta.ravel()))


def _producing_batchnorm(value: ir.Value) -> BatchNormStats | None:
    """The batch-norm behind ``value`` (through pass-through ops), with the lowest upper bound of a constant
    ``Clip`` on the way as its ``cap``."""
    node, cap = value.producer(), None
    while node is not None and node.op_type in _PASS_THROUGH:
        high = const_array(node.inputs[2]) if node.op_type == "Clip" and len(node.inputs) > 2 else None
        if high is not None and high.size == 1:
            bound = float(high.reshape(-1)[0])
            cap = bound if cap is None else min(cap, bound)
        node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    stats = _bn_stats(node) if node is not None and node.op_type == "BatchNormalization" else None
    return stats if stats is None or cap is None or cap <= 0 else dataclasses.replace(stats, cap=cap)


def _is_non_negative(value: ir.Value, depth: int = 0) -> bool:
    node = value.producer()
    if node is None or depth > 64:
        return False
    if node.op_type in _NON_NEGATIVE:
        return True
    if node.op_type == "Clip":
        low = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        return low is not None and float(low) >= 0
    if node.op_type in _PASS_THROUGH or node.op_type in ("Concat", "Add", "Mul", "Max"):
        data = [v for v in node.inputs if v is not None and v.const_value is None]
        if node.op_type in _PASS_THROUGH:
            data = data[:1]
        return bool(data) and all(_is_non_negative(v, depth + 1) for v in data)
    return False


def _layer(node: ir.Node, shapes: dict, label: str) -> QuantLayer | None:
    op = layer_op(node)
    if op is None or len(node.inputs) <= op.weight_input:
        return None
    weight = node.inputs[op.weight_input]
    if weight is None or weight.const_value is None or weight.const_value.dtype != _FLOAT:
        return None
    wshape = tuple(int(d) for d in weight.const_value.shape)
    out_shape = shapes.get(node.outputs[0].name)
    if out_shape is None:
        raise ModelError(f"{label}: node '{node.name}' ({node.op_type}) has no inferable output shape; "
                         "pass a concrete --input-shape")
    activation = node.inputs[op.activation_input]
    found = op.analyse(node, wshape, shapes.get(activation.name), out_shape)
    if found is None:
        return None
    return QuantLayer(
        node=node.name, op_type=node.op_type, weight=weight.name, weight_shape=wshape, kernel_axis=found.kernel_axis,
        bias=found.bias, activation=activation.name, output=found.output, kernels=found.kernels,
        conv_groups=found.groups, dot_length=found.dot_length, macs=found.macs,
        batchnorm=_follow_batchnorm(node.outputs[0]) if op.reads_batchnorm_after else None,
    )


def analyse(canonical, input_shape=None) -> SiteTable:
    label = canonical.label
    shape = concrete_input_shape(canonical, input_shape)
    shapes = _shapes(canonical, shape)
    graph = canonical.model.graph
    needed = [v.name for node in graph if (op := layer_op(node)) is not None
              for v in (node.inputs[op.activation_input], node.outputs[0])]
    missing = [name for name in dict.fromkeys(needed) if name not in shapes]
    if missing:
        shapes.update(_measured_shapes(canonical, shape, missing))
    layers = [layer for node in graph if (layer := _layer(node, shapes, label)) is not None]
    if not layers:
        *most, last = LAYER_OPS
        raise ModelError(f"{label}: no {', '.join(most)} or {last} with constant float weights; nothing to quantize")
    by_tensor: dict[str, list[str]] = {}
    for layer in layers:
        by_tensor.setdefault(layer.activation, []).append(layer.node)
    values = {v.name: v for node in graph for v in node.outputs}
    values.update({v.name: v for v in graph.inputs})
    activations = []
    for tensor, users in by_tensor.items():
        value = values[tensor]
        per_sample = shapes.get(tensor, ())[1:]
        producer = value.producer()
        activations.append(ActivationSite(
            tensor=tensor, layers=tuple(users), elements=int(math.prod(per_sample)), shape=tuple(per_sample),
            producer=producer.op_type if producer is not None else None,
            batchnorm=_producing_batchnorm(value), unsigned=_is_non_negative(value),
        ))
    found = {layer.node for layer in layers}
    floating = [f for node in graph if node.name not in found and (f := _float_layer(node, shapes)) is not None]
    if floating:
        logger.warning("%s: %s keep float weights (computed in the graph, not stored); they count 32 bits in "
                       "B_w,eff and CR", label, ", ".join(f"'{f.node}' ({f.op_type})" for f in floating))
    return SiteTable(canonical.input_name, shape, canonical.logits, tuple(layers), tuple(activations),
                     tuple(floating))


def _float_layer(node: ir.Node, shapes: dict) -> FloatLayer | None:
    """A layer op whose weight is computed from constants only (so it looks quantizable) but is no initializer."""
    op = layer_op(node)
    if op is None or len(node.inputs) <= op.weight_input:
        return None
    weight = node.inputs[op.weight_input]
    if weight is None or weight.const_value is not None or weight.name not in shapes or _reads_input(weight):
        return None
    return FloatLayer(node.name, node.op_type, weight.name, int(math.prod(shapes[weight.name])))


def _reads_input(value: ir.Value) -> bool:
    """True when ``value`` depends on a graph input (an activation, not a weight)."""
    stack, seen = [value], set()
    while stack:
        current = stack.pop()
        if current.is_graph_input():
            return True
        node = current.producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(v for v in node.inputs if v is not None)
    return False


def find_sites(model, input_shape: tuple[int, ...] | None = None) -> SiteTable:
    """Analyse a :class:`~impq_onnx.frontend.canonical.CanonicalModel`; see :mod:`impq_onnx.frontend.sites`."""
    return analyse(model, input_shape)

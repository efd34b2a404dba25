"""Make a classifier graph differentiable by onnxruntime-training 1.19, or say in one line why not.

onnxruntime-training 1.19.2's gradient builder has no gradient for several ops that image classifiers
export (measured on the installed build, see ``tests/engine/test_differentiable.py``): HardSigmoid and
HardSwish (MobileNetV3, PP-LCNet), PRelu, variadic Sum; it refuses Dropout and LayerNormalization
without their optional outputs (``GradientBuilderBase::O ... i < node_->OutputDefs().size()``), and it
fails with a native traceback deep in training. :func:`make_differentiable` rewrites each such node,
in the training and gradient graphs only, into exact equivalents it can differentiate:

- ``HardSigmoid(x) = Clip(alpha*x + beta, 0, 1)``; ``HardSwish(x) = x * HardSigmoid_{1/6, 1/2}(x)``;
- ``Dropout`` (every opset, inference mode) is the identity;
- ``PRelu(x, s) = Max(x, 0) + s * Min(x, 0)``;
- ``Sum(a, b, c) = (a + b) + c``;
- ``LayerNormalization`` gets its ``Mean`` and ``InvStdDev`` outputs (values unchanged);
- ``AveragePool`` (``ceil_mode=0``, explicit or no pads) is ``Conv(x, ones, group=C) / count``, count the
  window size (``count_include_pad=1`` or no pads) or the per-position count of real pixels: onnxruntime
  1.19's AveragePoolGrad writes a zero-sized gradient ("Can broadcast 0 by 0 or 1" in the Relu before it,
  tf2onnx and Caffe2 exports) or stops the process with SIGFPE (DenseNet's transitions);
- ``Resize``: the CPU build has no ResizeGrad kernel ("Could not find an implementation for
  ResizeGrad"). Nearest with integer spatial scales and a coordinate mode that repeats pixels is
  ``Unsqueeze -> Tile -> Reshape`` (bit-exact); every other 4-D resize of fixed height and width that
  scales only H and W (linear, cubic, antialiased, any coordinate mode but ``tf_crop_and_resize``) is
  ``MatMul(A_h, MatMul(x, A_w))``, the interpolation matrices read off onnxruntime's own Resize applied
  to unit images (a resize is linear in its input) and checked on a random image; a resize that is not
  separable that way, or whose sizes are unknown, is refused at the start (not in the list below).

The written model keeps the original ops. :func:`check_differentiable` then checks every node on the
path from the image input against :data:`DIFFERENTIABLE_OPS` (the ops whose gradient the installed
build was seen to build) and raises a one-line :class:`ModelError` naming the first that is not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from impq_onnx.errors import ModelError
from impq_onnx.runtime import inference_session

__all__ = ["DIFFERENTIABLE_OPS", "REWRITES", "make_differentiable", "check_differentiable", "check_trainable",
           "concrete_image_size"]

_PREFIX = "impq.grad"
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)

# Default-domain ops whose gradient onnxruntime-training 1.19.2 builds (each was built on a small graph).
# BatchNormalization is handled before the builder (training: BatchNormInternal; sensitivity:
# inference_batchnorm). Nodes whose outputs are not float (Shape, comparisons) end the gradient path.
DIFFERENTIABLE_OPS = frozenset({
    "Abs", "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Conv", "ConvTranspose", "Cos",
    "Div", "Erf", "Exp", "Expand", "Flatten", "Gather", "Gelu", "Gemm", "GlobalAveragePool", "Identity",
    "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax", "MatMul", "Max", "MaxPool", "Min", "Mul", "Neg", "Pad",
    "Pow", "Reciprocal", "ReduceL2", "ReduceLogSumExp", "ReduceMean", "ReduceSum", "Relu", "Reshape",
    "Sigmoid", "Sin", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "Transpose",
    "Unsqueeze", "Where",
})


def _scalar(graph: onnx.GraphProto, name: str, value: float) -> str:
    if not any(t.name == name for t in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
    return name


def _hard_sigmoid_nodes(graph: onnx.GraphProto, x: str, out: str, alpha: float, beta: float, base: str
                        ) -> list[onnx.NodeProto]:
    a = _scalar(graph, f"{base}/alpha", alpha)
    b = _scalar(graph, f"{base}/beta", beta)
    zero, one = _scalar(graph, f"{_PREFIX}/zero", 0.0), _scalar(graph, f"{_PREFIX}/one", 1.0)
    return [helper.make_node("Mul", [x, a], [f"{base}/ax"], name=f"{base}/Mul"),
            helper.make_node("Add", [f"{base}/ax", b], [f"{base}/axb"], name=f"{base}/Add"),
            helper.make_node("Clip", [f"{base}/axb", zero, one], [out], name=f"{base}/Clip")]


def _attribute(node: onnx.NodeProto, name: str, default: float) -> float:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _hard_sigmoid(graph: onnx.GraphProto, node: onnx.NodeProto, base: str) -> list[onnx.NodeProto]:
    return _hard_sigmoid_nodes(graph, node.input[0], node.output[0], _attribute(node, "alpha", 0.2),
                               _attribute(node, "beta", 0.5), base)


def _hard_swish(graph: onnx.GraphProto, node: onnx.NodeProto, base: str) -> list[onnx.NodeProto]:
    gate = _hard_sigmoid_nodes(graph, node.input[0], f"{base}/gate", 1.0 / 6.0, 0.5, base)
    return gate + [helper.make_node("Mul", [node.input[0], f"{base}/gate"], [node.output[0]], name=f"{base}/Mul_x")]


def _dropout(graph: onnx.GraphProto, node: onnx.NodeProto, base: str) -> list[onnx.NodeProto] | None:
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    if len(node.output) > 1 and node.output[1] and node.output[1] in used:
        return None  # a mask someone reads: leave the node to the builder
    return [helper.make_node("Identity", [node.input[0]], [node.output[0]], name=f"{base}/Identity")]


def _prelu(graph: onnx.GraphProto, node: onnx.NodeProto, base: str) -> list[onnx.NodeProto]:
    zero = _scalar(graph, f"{_PREFIX}/zero", 0.0)
    x, slope = node.input[0], node.input[1]
    return [helper.make_node("Max", [x, zero], [f"{base}/pos"], name=f"{base}/Max"),
            helper.make_node("Min", [x, zero], [f"{base}/neg"], name=f"{base}/Min"),
            helper.make_node("Mul", [f"{base}/neg", slope], [f"{base}/scaled"], name=f"{base}/Mul"),
            helper.make_node("Add", [f"{base}/pos", f"{base}/scaled"], [node.output[0]], name=f"{base}/Add")]


def _sum(graph: onnx.GraphProto, node: onnx.NodeProto, base: str) -> list[onnx.NodeProto]:
    inputs = list(node.input)
    if len(inputs) == 1:
        return [helper.make_node("Identity", inputs, [node.output[0]], name=f"{base}/Identity")]
    nodes, current = [], inputs[0]
    for i, name in enumerate(inputs[1:], start=1):
        out = node.output[0] if i == len(inputs) - 1 else f"{base}/partial{i}"
        nodes.append(helper.make_node("Add", [current, name], [out], name=f"{base}/Add{i}"))
        current = out
    return nodes


def _layer_norm(graph: onnx.GraphProto, node: onnx.NodeProto, base: str) -> list[onnx.NodeProto] | None:
    if len(node.output) >= 3 and all(node.output[:3]):
        return None
    rewritten = onnx.NodeProto()
    rewritten.CopyFrom(node)
    outputs = list(node.output) + [""] * (3 - len(node.output))
    outputs[1] = outputs[1] or f"{base}/mean"
    outputs[2] = outputs[2] or f"{base}/inv_std"
    del rewritten.output[:]
    rewritten.output.extend(outputs)
    return [rewritten]


def _any_attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _channels(graph: onnx.GraphProto, name: str) -> int | None:
    for value in (*graph.value_info, *graph.input):
        if value.name == name:
            dims = value.type.tensor_type.shape.dim
            return dims[1].dim_value if len(dims) >= 3 and dims[1].HasField("dim_value") else None
    return None


def _average_pool(graph: onnx.GraphProto, node: onnx.NodeProto, base: str) -> list[onnx.NodeProto] | None:
    kernel = list(_any_attribute(node, "kernel_shape", []))
    spatial = len(kernel)
    pads = list(_any_attribute(node, "pads", [0] * 2 * spatial))
    auto_pad = _any_attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    channels = _channels(graph, node.input[0])
    if (not spatial or _any_attribute(node, "ceil_mode", 0) or auto_pad not in ("NOTSET", "VALID") or channels is None
            or list(_any_attribute(node, "dilations", [1] * spatial)) != [1] * spatial):
        return None  # left to the builder (and to check_differentiable)
    if auto_pad == "VALID":
        pads = [0] * 2 * spatial
    strides = list(_any_attribute(node, "strides", [1] * spatial))
    ones = f"{base}/ones"
    graph.initializer.append(numpy_helper.from_array(np.ones([channels, 1, *kernel], np.float32), ones))
    conv: dict[str, Any] = {"kernel_shape": kernel, "strides": strides, "pads": pads, "group": channels}
    nodes = [helper.make_node("Conv", [node.input[0], ones], [f"{base}/sum"], name=f"{base}/Conv", **conv)]
    if _any_attribute(node, "count_include_pad", 0) or not any(pads):
        count = _scalar(graph, f"{base}/count", float(np.prod(kernel)))
    else:  # the real pixels under each window: the same sum over an all-ones image (no gradient flows there)
        count = f"{base}/count"
        nodes += [helper.make_node("Shape", [node.input[0]], [f"{base}/shape"], name=f"{base}/Shape"),
                  helper.make_node("ConstantOfShape", [f"{base}/shape"], [f"{base}/one_image"],
                                   name=f"{base}/ConstantOfShape",
                                   value=numpy_helper.from_array(np.ones([1], np.float32))),
                  helper.make_node("Conv", [f"{base}/one_image", ones], [count], name=f"{base}/Count", **conv)]
    nodes.append(helper.make_node("Div", [f"{base}/sum", count], [node.output[0]], name=f"{base}/Div"))
    return nodes


def _shape_of(graph: onnx.GraphProto, name: str) -> list[int] | None:
    for value in (*graph.value_info, *graph.input):
        if value.name == name:
            dims = value.type.tensor_type.shape.dim
            return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in dims]
    return None


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    found = next((t for t in graph.initializer if t.name == name), None)
    return numpy_helper.to_array(found) if found is not None else None


def _text(node: onnx.NodeProto, name: str, default: str) -> str:
    value = _any_attribute(node, name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _resize_inputs(graph: onnx.GraphProto, node: onnx.NodeProto, shape: list[int]
                   ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The constant ``(scales, sizes)`` of a Resize (one of them None); sizes from the inferred output shape
    when they are computed in the graph; ``(None, None)`` when neither is known."""
    if len(node.input) == 2:  # opset 10: (X, scales)
        return _constant(graph, node.input[1]), None
    scales = _constant(graph, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scales is not None and scales.size == len(shape):
        return scales.astype(np.float32), None
    sizes = _constant(graph, node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if sizes is None and len(node.input) > 3 and node.input[3]:
        out = _shape_of(graph, node.output[0])
        sizes = np.array(out, np.int64) if out is not None and -1 not in out[1:] else None
    if sizes is not None and sizes.size == len(shape):
        return None, sizes.astype(np.int64)
    return None, None


def _nearest_repeat(graph: onnx.GraphProto, node: onnx.NodeProto, base: str, shape: list[int],
                    factors: list[float]) -> list[onnx.NodeProto] | None:
    """Nearest with integer scales in a mode that repeats each pixel: ``Unsqueeze -> Tile -> Reshape``."""
    ints = [int(round(f)) for f in factors]
    if any(f != i or i < 1 for f, i in zip(factors, ints)) or _text(node, "mode", "nearest") != "nearest":
        return None
    transform = _text(node, "coordinate_transformation_mode", "half_pixel")
    nearest = _text(node, "nearest_mode", "round_prefer_floor")
    if len(node.input) == 2:
        transform = "asymmetric"  # opset 10's only mode, with floor
        nearest = "floor"
    if not (transform in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn")
            or (transform == "asymmetric" and nearest == "floor")):
        return None  # these modes repeat each pixel s times for an integer scale s; others do not
    sh, sw = ints[2], ints[3]
    axes, repeats, target = f"{base}/axes", f"{base}/repeats", f"{base}/target"
    graph.initializer.extend([
        numpy_helper.from_array(np.array([3, 5], np.int64), axes),
        numpy_helper.from_array(np.array([1, 1, 1, sh, 1, sw], np.int64), repeats),
        numpy_helper.from_array(np.array([0, shape[1], shape[2] * sh, shape[3] * sw], np.int64), target)])
    return [helper.make_node("Unsqueeze", [node.input[0], axes], [f"{base}/x6"], name=f"{base}/Unsqueeze"),
            helper.make_node("Tile", [f"{base}/x6", repeats], [f"{base}/tiled"], name=f"{base}/Tile"),
            helper.make_node("Reshape", [f"{base}/tiled", target], [node.output[0]], name=f"{base}/Reshape")]


def interpolation_matrices(node: onnx.NodeProto, height: int, width: int, scales: np.ndarray | None,
                           sizes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """``(A_h [H_out, H], A_w [W, W_out])`` with ``Resize(x) = A_h @ x @ A_w`` for every ``[N, C, H, W]`` image,
    read off onnxruntime's Resize (``node``'s attributes) applied to unit images; None when the resize is not
    separable that way (checked on a random image)."""
    resize = onnx.NodeProto()
    resize.CopyFrom(node)
    del resize.input[:]
    if len(node.input) == 2:
        resize.input.extend(["x", "scales"])
        opset, rate = 10, "scales"
    else:
        resize.input.extend(["x", "", "scales"] if scales is not None else ["x", "", "", "sizes"])
        opset, rate = 19, "scales" if scales is not None else "sizes"
    del resize.output[:]
    resize.output.append("y")
    rate_type = TensorProto.FLOAT if scales is not None else TensorProto.INT64
    graph = helper.make_graph([resize], "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
                                                  helper.make_tensor_value_info(rate, rate_type, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    try:
        session = inference_session(model.SerializeToString(), 1, optimize=False)

        def run(x: np.ndarray) -> np.ndarray:
            feed = scales if scales is not None else np.array([len(x), 1, *np.asarray(sizes)[2:]], np.int64)
            return session.run(None, {"x": x, rate: feed})[0]

        def unit_images(n: int, axis: int) -> np.ndarray:
            """The resized images ``e_i`` (along ``axis``, constant along the other), 32 at a time."""
            chunks = []
            for start in range(0, n, 32):
                eye = np.eye(n, dtype=np.float32)[start:start + 32]
                unit = eye[:, None, :, None] if axis == 2 else eye[:, None, None, :]
                chunks.append(run(np.repeat(unit, width if axis == 2 else height, axis=5 - axis)))
            return np.concatenate(chunks)

        rows, cols = unit_images(height, 2), unit_images(width, 3)
        x = np.random.default_rng(0).standard_normal((1, 1, height, width)).astype(np.float32)
        want = run(x)
    except Exception:  # onnxruntime refuses the node standalone: leave it to check_differentiable
        return None
    a_h, a_w = rows[:, 0, :, 0].T.astype(np.float32), cols[:, 0, 0, :].astype(np.float32)
    close = lambda a, b: np.allclose(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731 - float sums of the weights
    separable = close(rows, rows[..., :1]) and close(cols, cols[..., :1, :])
    if not separable or not close(a_h @ x[0, 0].astype(np.float64) @ a_w, want[0, 0]):
        return None
    return a_h, a_w


def _resize(graph: onnx.GraphProto, node: onnx.NodeProto, base: str) -> list[onnx.NodeProto] | None:
    shape = _shape_of(graph, node.input[0])
    if (shape is None or len(shape) != 4 or -1 in shape[1:] or any(a.name == "axes" for a in node.attribute)
            or _text(node, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize"):
        return None
    scales, sizes = _resize_inputs(graph, node, shape)
    if scales is not None:
        if [float(v) for v in scales[:2]] != [1.0, 1.0]:
            return None
        repeat = _nearest_repeat(graph, node, base, shape, [float(v) for v in scales])
    elif sizes is not None:
        if [int(v) for v in sizes[1:2]] != shape[1:2]:
            return None
        repeat = (None if any(a.name == "keep_aspect_ratio_policy" for a in node.attribute) else
                  _nearest_repeat(graph, node, base, shape, [1.0, 1.0] + [float(sizes[i]) / shape[i] for i in (2, 3)]))
    else:
        return None
    if repeat is not None:
        return repeat
    matrices = interpolation_matrices(node, shape[2], shape[3], scales, sizes)
    if matrices is None:
        return None
    rows, cols = f"{base}/rows", f"{base}/cols"
    graph.initializer.extend([numpy_helper.from_array(matrices[0], rows), numpy_helper.from_array(matrices[1], cols)])
    return [helper.make_node("MatMul", [node.input[0], cols], [f"{base}/x_cols"], name=f"{base}/MatMul_cols"),
            helper.make_node("MatMul", [rows, f"{base}/x_cols"], [node.output[0]], name=f"{base}/MatMul_rows")]


# op type -> rewrite(graph, node, name prefix) -> replacement nodes (None: leave the node as it is)
REWRITES: dict[str, Callable[[onnx.GraphProto, onnx.NodeProto, str], list[onnx.NodeProto] | None]] = {
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "Dropout": _dropout,
    "PRelu": _prelu,
    "Sum": _sum,
    "LayerNormalization": _layer_norm,
    "AveragePool": _average_pool,
    "Resize": _resize,
}


def make_differentiable(proto: onnx.ModelProto) -> int:
    """Rewrite (in place) every node of :data:`REWRITES` into its exact equivalent; returns how many."""
    graph = proto.graph
    if any(node.op_type in ("AveragePool", "Resize") for node in graph.node):  # their rewrites need shapes
        _infer_value_info(proto)
    nodes: list[onnx.NodeProto] = []
    count = 0
    for position, node in enumerate(graph.node):
        rewrite = REWRITES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        replacement = rewrite(graph, node, f"{_PREFIX}/{node.name or position}") if rewrite else None
        if replacement is None:
            nodes.append(node)
            continue
        nodes.extend(replacement)
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def _known_dims(value: onnx.ValueInfoProto) -> int:
    """How many dims of ``value`` have a number (-1: no shape at all)."""
    if not value.type.tensor_type.HasField("shape"):
        return -1
    return sum(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim)


def _static(value: onnx.ValueInfoProto) -> bool:
    return _known_dims(value) == len(value.type.tensor_type.shape.dim)


def _infer_value_info(proto: onnx.ModelProto) -> None:
    """Shapes for every tensor; those recorded with symbolic dims (a height/width that was dynamic before
    :func:`concrete_image_size`) are inferred again from the declared input."""
    trial = onnx.ModelProto()
    trial.CopyFrom(proto)
    del trial.graph.value_info[:]
    trial.graph.value_info.extend(v for v in proto.graph.value_info if _static(v))
    for node in trial.graph.node:  # onnx infers no shape through the simulation's quantizers: same shape out
        if node.op_type == "FakeQuant" and node.domain == "com.microsoft":
            node.CopyFrom(helper.make_node("Identity", node.input[:1], node.output[:1], name=node.name))
    try:
        inferred = onnx.shape_inference.infer_shapes(trial, check_type=False, strict_mode=False)
    except Exception:  # without shapes the pools stay as they are
        return
    found = {v.name: v for v in inferred.graph.value_info}
    kept = [found[v.name] if v.name in found and _known_dims(found[v.name]) > _known_dims(v) else v
            for v in proto.graph.value_info]
    known = {v.name for v in kept}
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept + [v for v in inferred.graph.value_info if v.name not in known])


def _float_values(proto: onnx.ModelProto) -> Callable[[str], bool]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False)
    except Exception:  # types only narrow the check; without them every tensor counts as float
        return lambda name: True
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    return lambda name: types.get(name, TensorProto.FLOAT) in _FLOAT_TYPES or types.get(name) == 0


def check_differentiable(proto: onnx.ModelProto, label: str = "the model", skip_prefix: str = "impq") -> None:
    """Raise a one-line ModelError naming the first node on the image input's float path whose op the
    gradient builder lacks. Nodes named ``skip_prefix...`` (the tool's own) and other domains are not checked."""
    initializers = {t.name for t in proto.graph.initializer}
    reached = {i.name for i in proto.graph.input if i.name not in initializers}
    is_float = _float_values(proto)
    missing: list[onnx.NodeProto] = []
    for node in proto.graph.node:
        if not any(name in reached for name in node.input):
            continue
        outputs = [name for name in node.output if name and is_float(name)]
        if not outputs:
            continue  # Shape, comparisons, ArgMax: no gradient flows through
        reached.update(outputs)
        if node.name.startswith(skip_prefix) or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type not in DIFFERENTIABLE_OPS:
            missing.append(node)
    if missing:
        first = missing[0]
        others = sorted({n.op_type for n in missing} - {first.op_type})
        more = f" (also: {', '.join(others)})" if others else ""
        raise ModelError(
            f"{label}: onnxruntime-training 1.19 cannot differentiate node '{first.name}' ({first.op_type}): it has "
            f"no gradient, so fine-tuning and sensitivity cannot run{more}; re-export with supported ops"
        )


def concrete_image_size(proto: onnx.ModelProto, shape: tuple[int, ...]) -> None:
    """Declare the training batch's height/width (every non-batch dim) where the model leaves them dynamic.

    onnxruntime-training 1.19 builds wrong gradients for pools over unknown spatial sizes (a zero-sized
    ``Relu_Grad`` input after a MaxPool, a segmentation fault in other exports); with the data's size
    declared, the graph is the one the training batches have anyway."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != len(shape):
        return
    for dim, size in list(zip(dims, shape))[1:]:
        if not dim.HasField("dim_value") or dim.dim_value <= 0:
            dim.Clear()
            dim.dim_value = int(size)


def check_trainable(model, label: str | None = None, input_shape: tuple[int, ...] | None = None) -> None:
    """:func:`check_differentiable` on a copy of ``model`` (CanonicalModel or ModelProto) after the rewrites,
    with a dynamic height/width declared as ``input_shape``'s (the size training runs at)."""
    from impq_onnx.quant.simulate import as_proto

    proto = as_proto(model)
    if input_shape is not None:
        concrete_image_size(proto, input_shape)
    make_differentiable(proto)
    check_differentiable(proto, label or str(getattr(model, "label", None) or "the model"))

"""A tiny trainable CNN and a learnable synthetic task for the plan/simulate/engine tests.

Network: conv3x3(3->8)+BN+Relu -> conv3x3(8->12, stride 2)+BN+Relu -> GlobalAveragePool -> Flatten
-> Gemm(12->4). Input N x 3 x 8 x 8 (dynamic batch), opset 17, BN unfolded.
Task: the class is the quadrant of the image that is bright (4 classes).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CLASSES = 4
SIZE = 8


def tiny_cnn(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=None, value=None):
        if value is not None:
            arr = np.full(shape, value, np.float32)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            arr = rng.standard_normal(shape).astype(np.float32) * (scale or np.sqrt(2.0 / fan_in))
        return numpy_helper.from_array(arr.astype(np.float32), name)

    inits = [
        init("conv1.w", 8, 3, 3, 3), init("bn1.scale", 8, value=1.0), init("bn1.bias", 8, value=0.0),
        init("bn1.mean", 8, value=0.0), init("bn1.var", 8, value=1.0),
        init("conv2.w", 12, 8, 3, 3), init("bn2.scale", 12, value=1.0), init("bn2.bias", 12, value=0.0),
        init("bn2.mean", 12, value=0.0), init("bn2.var", 12, value=1.0),
        init("fc.w", CLASSES, 12, scale=0.3), init("fc.b", CLASSES, value=0.0),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"], ["b1"], name="bn1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.w"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c2", "bn2.scale", "bn2.bias", "bn2.mean", "bn2.var"], ["b2"], name="bn2"),
        helper.make_node("Relu", ["b2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def quadrant_batch(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    x = rng.standard_normal((n, 3, SIZE, SIZE)).astype(np.float32) * 0.5
    h = SIZE // 2
    for i, c in enumerate(y):
        r0, c0 = (c // 2) * h, (c % 2) * h
        x[i, :, r0:r0 + h, c0:c0 + h] += 1.0
    return x, y


def quadrant_batches(count: int, batch: int = 32, seed: int = 0):
    """A factory: each call yields the same ``count`` batches."""

    def factory():
        rng = np.random.default_rng(seed)
        for _ in range(count):
            yield quadrant_batch(batch, rng)

    return factory


def canonical_and_sites(model: onnx.ModelProto | None = None):
    from impq_onnx.frontend.canonical import from_proto
    from impq_onnx.frontend.site_analysis import find_sites

    canonical = from_proto(model if model is not None else tiny_cnn())
    return canonical, find_sites(canonical, (1, 3, SIZE, SIZE))


def linear_classifier(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """``logits = x @ w.T + b`` as one Gemm named ``fc``: the case whose gradients are known in closed form."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["logits"], name="fc", transB=1)],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", w.shape[0]])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model

"""Tiny classifiers built in code, one knob per real-world export quirk (DESIGN.md, "frontend").

Every model is the same network so tests can compare site tables across quirks:
conv3x3(3->4) [+BN | +bias] -> Relu -> depthwise conv3x3(4, group 4) -> Relu -> GlobalAveragePool
-> Flatten -> Gemm(4->5) or MatMul+Add -> [Softmax]. Input 1x3x8x8 (or NHWC 1x8x8x3).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

H = W = 8
CLASSES = 5
# (op, kernels, params, MACs per sample, dot length) of the three layers for an 8x8 input
EXPECTED_LAYERS = [
    ("Conv", 4, 4 * 3 * 9, 4 * 8 * 8 * 27, 27),
    ("Conv", 4, 4 * 9, 4 * 8 * 8 * 9, 9),
    (None, 5, 4 * 5, 20, 4),  # Gemm or MatMul
]


@dataclasses.dataclass(frozen=True)
class Quirks:
    opset: int = 13
    weights: str = "initializer"  # "initializer", "constant" or "graph_input" (IR 3 style)
    batchnorm: bool = True  # unfolded BatchNormalization after the first conv (else a conv bias)
    head: str = "gemm"  # "gemm" or "matmul" (MatMul + Add)
    softmax: bool = False
    two_outputs: bool = False
    nhwc: bool = False
    float16: bool = False
    dynamic_hw: bool = False
    ir_version: int | None = None
    seed: int = 0


def weights(seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {
        "conv1.w": rng.standard_normal((4, 3, 3, 3)) * 0.4,
        "conv1.b": rng.standard_normal(4) * 0.1,
        "bn.scale": rng.uniform(0.5, 1.5, 4),
        "bn.bias": rng.standard_normal(4) * 0.2,
        "bn.mean": rng.standard_normal(4) * 0.1,
        "bn.var": rng.uniform(0.5, 1.5, 4),
        "dw.w": rng.standard_normal((4, 1, 3, 3)) * 0.4,
        "fc.w": rng.standard_normal((5, 4)) * 0.5,
        "fc.b": rng.standard_normal(5) * 0.1,
        "fc.wt": None,
    }
    w["fc.wt"] = w["fc.w"].T.copy()
    return {k: v.astype(dtype) for k, v in w.items()}


def build(q: Quirks = Quirks()) -> onnx.ModelProto:
    dtype = np.float16 if q.float16 else np.float32
    elem = TensorProto.FLOAT16 if q.float16 else TensorProto.FLOAT
    w = weights(q.seed, dtype)
    used = ["conv1.w", "dw.w"] + (["bn.scale", "bn.bias", "bn.mean", "bn.var"] if q.batchnorm else ["conv1.b"])
    used += ["fc.w", "fc.b"] if q.head == "gemm" else ["fc.wt", "fc.b"]
    nodes, inits, extra_inputs = [], [], []
    for name in used:
        if q.weights == "constant":
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(w[name], name)))
        else:
            inits.append(numpy_helper.from_array(w[name], name))
            if q.weights == "graph_input":
                extra_inputs.append(helper.make_tensor_value_info(name, elem, list(w[name].shape)))
    hw = ["H", "W"] if q.dynamic_hw else [H, W]
    if q.nhwc:
        x = helper.make_tensor_value_info("image", elem, ["N", *hw, 3])
        nodes.append(helper.make_node("Transpose", ["image"], ["x_nchw"], perm=[0, 3, 1, 2], name="to_nchw"))
        first = "x_nchw"
    else:
        x = helper.make_tensor_value_info("image", elem, ["N", 3, *hw])
        first = "image"
    conv_inputs = [first, "conv1.w"] + ([] if q.batchnorm else ["conv1.b"])
    nodes.append(helper.make_node("Conv", conv_inputs, ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3], name="conv1"))
    if q.batchnorm:
        bn_kw = {"epsilon": 1e-5}
        nodes.append(helper.make_node("BatchNormalization", ["c1", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b1"],
                                      name="bn1", **bn_kw))
        nodes.append(helper.make_node("Relu", ["b1"], ["r1"], name="relu1"))
    else:
        nodes.append(helper.make_node("Relu", ["c1"], ["r1"], name="relu1"))
    nodes.append(helper.make_node("Conv", ["r1", "dw.w"], ["c2"], pads=[1, 1, 1, 1], kernel_shape=[3, 3], group=4,
                                  name="dwconv"))
    nodes.append(helper.make_node("Relu", ["c2"], ["r2"], name="relu2"))
    nodes.append(helper.make_node("GlobalAveragePool", ["r2"], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["features"], axis=1, name="flatten"))
    if q.head == "gemm":
        nodes.append(helper.make_node("Gemm", ["features", "fc.w", "fc.b"], ["logits"], transB=1, name="fc"))
    else:
        nodes.append(helper.make_node("MatMul", ["features", "fc.wt"], ["mm"], name="fc"))
        nodes.append(helper.make_node("Add", ["mm", "fc.b"], ["logits"], name="fc_bias"))
    outputs = []
    if q.softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1, name="softmax"))
        outputs.append(helper.make_tensor_value_info("probs", elem, ["N", CLASSES]))
    else:
        outputs.append(helper.make_tensor_value_info("logits", elem, ["N", CLASSES]))
    if q.two_outputs:
        outputs.append(helper.make_tensor_value_info("features", elem, ["N", 4, 1, 1][:2]))
    graph = helper.make_graph(nodes, "tiny", [x] + extra_inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", q.opset)], producer_name="impq-tests")
    model.ir_version = q.ir_version or (3 if q.weights == "graph_input" else min(onnx.IR_VERSION, 10))
    return model


def two_heads() -> onnx.ModelProto:
    """``Quirks(two_outputs=True)`` with a second classifier head on the features (output ``aux``): two outputs
    then look like logits, and none can be picked without ``--logits``."""
    proto = build(Quirks(two_outputs=True))
    proto.graph.node.append(helper.make_node("Gemm", ["features", "fc.w", "fc.b"], ["aux"], transB=1, name="aux"))
    proto.graph.output[1].CopyFrom(helper.make_tensor_value_info("aux", onnx.TensorProto.FLOAT, ["N", CLASSES]))
    return proto


def float_reference(q: Quirks) -> onnx.ModelProto:
    """The float32 twin of ``q`` giving logits only (float16 weights widened exactly)."""
    proto = build(dataclasses.replace(q, float16=False, weights="initializer", ir_version=None, softmax=False,
                                      two_outputs=False))
    if q.float16:
        for init in proto.graph.initializer:
            arr = numpy_helper.to_array(init).astype(np.float16).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return proto


def sample_input(q: Quirks, batch: int = 3, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (batch, H, W, 3) if q.nhwc else (batch, 3, H, W)
    return rng.standard_normal(shape).astype(np.float16 if q.float16 else np.float32)

"""Batch-norm in the training graph: the model's own BatchNormalization nodes, trained with batch
statistics (:func:`batchnorm_to_training`: what onnxruntime-training does anyway, made explicit so the
running statistics come back as outputs) or frozen (:func:`batchnorm_frozen`: inference arithmetic with
the running statistics as constants). Both leave the simulation's own nodes alone."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import helper

from impq_onnx.quant.simulate import SIMULATION_PREFIX

__all__ = ["BATCHNORM_MODES", "batchnorm_frozen", "batchnorm_to_training", "own_batchnorms"]

BATCHNORM_MODES = ("train", "frozen")
_RUNNING = "/impq_running"  # suffix of the running-statistics outputs


def own_batchnorms(proto: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """The model's BatchNormalization nodes (not the fake-quant simulation's)."""
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization" and not node.name.startswith(SIMULATION_PREFIX + "/"):
            yield node


def batchnorm_to_training(proto: onnx.ModelProto, momentum: float | None) -> dict[str, str]:
    """Switch the model's own BatchNormalization nodes to training mode; return {output: stat name}."""
    opset = next((e.version for e in proto.opset_import if e.domain in ("", "ai.onnx")), 13)
    inits = {t.name for t in proto.graph.initializer}
    running: dict[str, str] = {}
    for node in own_batchnorms(proto):
        mean, var = node.input[3], node.input[4]
        if mean not in inits or var not in inits:
            continue
        outputs = [node.output[0], mean + _RUNNING, var + _RUNNING]
        if opset < 14:  # BatchNormalization-9 trains when it has all five outputs
            outputs += [mean + _RUNNING + "/saved", var + _RUNNING + "/saved"]
        del node.output[:]
        node.output.extend(outputs)
        attrs = [a for a in node.attribute if a.name not in ("training_mode", "momentum")]
        if opset >= 14:
            attrs.append(helper.make_attribute("training_mode", 1))
        if momentum is not None:
            attrs.append(helper.make_attribute("momentum", float(momentum)))
        del node.attribute[:]
        node.attribute.extend(attrs)
        running[outputs[1]] = mean
        running[outputs[2]] = var
    return running



def batchnorm_frozen(proto: onnx.ModelProto) -> int:
    """Replace the model's own BatchNormalization nodes by their inference-mode arithmetic: ``y = x * a + b``
    with ``a = gamma / sqrt(var + eps)`` and ``b = beta - mean * a``, the running statistics constants and
    ``gamma``, ``beta`` still the trained parameters (onnxruntime-training would otherwise normalise with
    batch statistics). Exact in value (inference batch-norm), and the statistics the pretrained model
    learned on its own data are kept: a small fine-tune set cannot pull them. Returns how many nodes."""
    inits = {t.name: t for t in proto.graph.initializer}
    ranks: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
        for value in [*inferred.graph.value_info, *inferred.graph.input]:
            if value.type.tensor_type.HasField("shape"):
                ranks[value.name] = len(value.type.tensor_type.shape.dim)
    except Exception:  # noqa: BLE001 - unknown ranks fall back to the producing layer's weight rank or 4
        pass
    producers = {o: n for n in proto.graph.node for o in n.output}
    nodes: list[onnx.NodeProto] = []
    count = 0
    own = {id(node) for node in own_batchnorms(proto)}
    for node in proto.graph.node:
        params = list(node.input[1:5])
        if id(node) not in own or len(params) < 4 or any(p not in inits for p in params):
            nodes.append(node)
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        mean, var = (onnx.numpy_helper.to_array(inits[p]).astype(np.float64) for p in params[2:])
        producer = producers.get(node.input[0])
        weight = inits.get(producer.input[1]) if producer is not None and len(producer.input) > 1 else None
        rank = ranks.get(node.input[0], len(weight.dims) if weight is not None else 4)
        shape = [-1] + [1] * max(rank - 2, 0)
        prefix = f"{node.name or node.output[0]}/frozen_bn"
        proto.graph.initializer.extend([
            onnx.numpy_helper.from_array((1.0 / np.sqrt(var + eps)).astype(np.float32), f"{prefix}/inv_std"),
            onnx.numpy_helper.from_array(mean.astype(np.float32), f"{prefix}/mean"),
            onnx.numpy_helper.from_array(np.array(shape, np.int64), f"{prefix}/shape"),
        ])
        gamma, beta = params[0], params[1]
        nodes += [
            helper.make_node("Mul", [gamma, f"{prefix}/inv_std"], [f"{prefix}/a"], name=f"{prefix}/mul_a"),
            helper.make_node("Mul", [f"{prefix}/mean", f"{prefix}/a"], [f"{prefix}/ma"], name=f"{prefix}/mul_ma"),
            helper.make_node("Sub", [beta, f"{prefix}/ma"], [f"{prefix}/b"], name=f"{prefix}/sub_b"),
            helper.make_node("Reshape", [f"{prefix}/a", f"{prefix}/shape"], [f"{prefix}/a4"], name=f"{prefix}/shape_a"),
            helper.make_node("Reshape", [f"{prefix}/b", f"{prefix}/shape"], [f"{prefix}/b4"], name=f"{prefix}/shape_b"),
            helper.make_node("Mul", [node.input[0], f"{prefix}/a4"], [f"{prefix}/xa"], name=f"{prefix}/mul_x"),
            helper.make_node("Add", [f"{prefix}/xa", f"{prefix}/b4"], [node.output[0]], name=f"{prefix}/add_b"),
        ]
        count += 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return count

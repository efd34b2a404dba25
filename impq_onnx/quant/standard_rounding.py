"""The simulation graph without onnxruntime's training-only contrib op, for inference in mainline onnxruntime.

:func:`impq_onnx.quant.simulate.simulate` rounds with ``com.microsoft::FakeQuant`` because it has a
straight-through gradient in onnxruntime-training. Mainline onnxruntime has no FakeQuant kernel, so
``evaluate --plan`` and ``verify`` would fail there. For inference only, each FakeQuant whose mask
output nothing reads becomes the standard ops that compute the same float32 values::

    FakeQuant(x, s, z; quant_min, quant_max) = (clamp(nearbyint(x / s + z), quant_min, quant_max) - z) * s
                                             = Mul(Sub(Clip(Round(Add(Div(x, s), z)), min, max), z), s)

``Round`` is half to even, as ``nearbyint`` in the default rounding mode; clamping to integer bounds
before or after rounding gives the same integer. :func:`for_inference` rewrites only when the running
onnxruntime lacks FakeQuant, so the training build keeps running exactly the graph it trains; the test
checks that both forms agree bit for bit.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["fake_quant_as_standard_ops", "for_inference", "runtime_has_fake_quant"]

_DOMAIN = "com.microsoft"


def fake_quant_as_standard_ops(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` with every mask-less ``com.microsoft::FakeQuant`` as Div/Add/Round/Clip/Sub/Mul."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    nodes = []
    for node in graph.node:
        if node.op_type != "FakeQuant" or node.domain != _DOMAIN or (len(node.output) > 1 and node.output[1] in read):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        p = f"{node.name or node.output[0]}/std"
        bounds = (("lo", attrs.get("quant_min", 0)), ("hi", attrs.get("quant_max", 255)))
        graph.initializer.extend([numpy_helper.from_array(np.array(v, np.float32), f"{p}/{k}") for k, v in bounds])
        x, scale, zero = node.input[0], node.input[1], node.input[2]
        nodes += [helper.make_node("Div", [x, scale], [f"{p}/div"], name=f"{p}/Div"),
                  helper.make_node("Add", [f"{p}/div", zero], [f"{p}/shift"], name=f"{p}/Add"),
                  helper.make_node("Round", [f"{p}/shift"], [f"{p}/round"], name=f"{p}/Round"),
                  helper.make_node("Clip", [f"{p}/round", f"{p}/lo", f"{p}/hi"], [f"{p}/int"], name=f"{p}/Clip"),
                  helper.make_node("Sub", [f"{p}/int", zero], [f"{p}/centred"], name=f"{p}/Sub"),
                  helper.make_node("Mul", [f"{p}/centred", scale], [node.output[0]], name=f"{p}/Mul")]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(n.domain == _DOMAIN for n in graph.node):
        kept = [o for o in out.opset_import if o.domain != _DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(kept)
    return out


@functools.lru_cache(maxsize=1)
def runtime_has_fake_quant() -> bool:
    """Whether the installed onnxruntime has a FakeQuant kernel (the training build has, mainline not)."""
    import onnxruntime as ort

    node = helper.make_node("FakeQuant", ["x", "s", "z"], ["y", "m"], domain=_DOMAIN, quant_min=0, quant_max=255)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
                              [numpy_helper.from_array(np.array(1.0, np.float32), "s"),
                               numpy_helper.from_array(np.array(0.0, np.float32), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(_DOMAIN, 1)],
                              ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own types for a missing kernel
        return False
    return True


def for_inference(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` as the running onnxruntime can execute it (unchanged where FakeQuant exists)."""
    return proto if runtime_has_fake_quant() else fake_quant_as_standard_ops(proto)

"""Property: for random conv/gemm chains, load -> canonicalise -> save preserves the outputs."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import impq_onnx
from impq_onnx.runtime import inference_session


@st.composite
def chains(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    opset = draw(st.sampled_from([7, 9, 11, 13, 17, 21]))
    channels = draw(st.integers(1, 4))
    size = draw(st.integers(3, 7))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])
    nodes, inits, current = [], [], "x"
    for i in range(draw(st.integers(1, 3))):
        out_c = draw(st.integers(1, 5))
        groups = draw(st.sampled_from([1, channels])) if out_c % channels == 0 else 1
        k = draw(st.sampled_from([1, 3]))
        w = rng.standard_normal((out_c, channels // groups, k, k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inputs = [current, f"w{i}"]
        if draw(st.booleans()):
            inits.append(numpy_helper.from_array(rng.standard_normal(out_c).astype(np.float32), f"b{i}"))
            inputs.append(f"b{i}")
        nodes.append(helper.make_node("Conv", inputs, [f"c{i}"], pads=[k // 2] * 4, group=groups))
        act = draw(st.sampled_from(["Relu", "Sigmoid", None]))
        current = f"c{i}"
        if act:
            nodes.append(helper.make_node(act, [current], [f"a{i}"]))
            current = f"a{i}"
        channels = out_c
    nodes.append(helper.make_node("Flatten", [current], ["flat"], axis=1))
    features = channels * size * size
    classes = draw(st.integers(2, 6))
    if draw(st.booleans()):
        inits += [numpy_helper.from_array(rng.standard_normal((classes, features)).astype(np.float32), "fc"),
                  numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "fcb")]
        nodes.append(helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], transB=1))
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal((features, classes)).astype(np.float32), "fc"))
        nodes.append(helper.make_node("MatMul", ["flat", "fc"], ["logits"]))
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])
    model = helper.make_model(helper.make_graph(nodes, "chain", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 21 else 10
    return model, rng.standard_normal((2, x.type.tensor_type.shape.dim[1].dim_value, size, size)).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(chains())
def test_load_canonicalise_save_preserves_outputs(tmp_path_factory, case):
    model, x = case
    path = tmp_path_factory.mktemp("chain") / "m.onnx"
    onnx.save(model, path)
    canonical = impq_onnx.load(path)
    saved = path.with_name("canonical.onnx")
    onnx.save(canonical.to_proto(), saved)
    before = inference_session(model.SerializeToString()).run(None, {"x": x})[0]
    after = inference_session(saved.read_bytes()).run(None, {"x": x})[0]
    assert np.max(np.abs(before - after)) <= 1e-5 * max(1.0, float(np.max(np.abs(before))))
    table = impq_onnx.find_sites(canonical)
    assert len(table.layers) == sum(1 for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul"))

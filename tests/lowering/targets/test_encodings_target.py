"""ToEncodingsPass + encodings_of: on-grid float weights and an encodings JSON that reproduce the simulation."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from impq_onnx.lowering.lower import lower
from impq_onnx.lowering.passes import QuantizeActivationsPass, QuantizeWeightsPass
from impq_onnx.quant.simulate import simulate
from impq_onnx.lowering.targets import ToEncodingsPass, apply_encodings, encodings_of
from impq_onnx.lowering.verify import verify
from lowering_cases import SCHEMES, inputs, mixed_plan, ops, run, tiny


def residual_model() -> onnx.ModelProto:
    """conv -> relu -> r1 -> conv -> Add(., r1) -> relu -> pool -> gemm: r1 also feeds the residual Add."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.4, n)
             for n, s in (("c1.w", (4, 3, 3, 3)), ("c2.w", (4, 4, 3, 3)), ("fc.w", (5, 4)), ("fc.b", (5,)))]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.w"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("scheme", SCHEMES)
def test_encodings_pass_counts_numbers_idempotence(scheme):
    canonical, sites = tiny(residual_model())
    plan = mixed_plan(sites, scheme, float_kernel=False)
    model = canonical.model.clone()
    QuantizeWeightsPass(plan, sites)(model)
    QuantizeActivationsPass(plan, sites)(model)
    encodings = encodings_of(model, plan, sites)
    assert ToEncodingsPass(plan, sites)(model).modified
    widened = sum(1 for b in plan.activations.values() if b is not None and b < 4)  # 0.6.1 states >= 4 bits
    kept = ops(model) - ops(canonical.model)  # r1 split: the residual Add reads float (Identity, or the kept Clip)
    assert kept["Clip"] == widened and kept["Identity"] == (0 if plan.activations["r1"] < 4 else 1)
    assert "r1_layer_input" in encodings["activation_encodings"]
    proto = ir.serde.serialize_model(model)
    axes = {layer.weight: layer.kernel_axis for layer in sites.layers}
    x = inputs()
    np.testing.assert_array_equal(run(apply_encodings(proto, encodings, axes), x), run(simulate(canonical, plan, sites), x))
    assert not ToEncodingsPass(plan, sites)(model).modified


def test_encoding_entries_follow_the_aimet_convention():
    canonical, sites = tiny(residual_model())
    plan = mixed_plan(sites, "midrise-max", float_kernel=False)
    lowered = lower(canonical, plan, sites, format="encodings")
    assert verify(lowered, canonical, plan, sites, [inputs()]).ok
    for entries in lowered.encodings["param_encodings"].values():
        for e in entries:
            assert e["offset"] == -(2 ** (e["bitwidth"] - 1)) and e["is_symmetric"] == "True"
            assert e["min"] == pytest.approx(e["offset"] * e["scale"])
            assert e["max"] == pytest.approx((e["offset"] + 2 ** e["bitwidth"] - 1) * e["scale"])
    acts = lowered.encodings["activation_encodings"]
    act = (acts.get("f") or acts["f_layer_input"])[0]
    assert act["offset"] == 0 and act["min"] == 0.0 and act["bitwidth"] == max(4, plan.activations["f"])

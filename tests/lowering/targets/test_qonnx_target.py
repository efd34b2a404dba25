"""ToQonnxPass: QDQ chains become QONNX Quant nodes that compute the same values."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from impq_onnx.lowering.passes import QuantizeActivationsPass, QuantizeWeightsPass
from impq_onnx.quant.simulate import simulate
from impq_onnx.lowering.targets import QONNX_DOMAIN, ToQonnxPass, qonnx_as_standard_ops
from impq_onnx.lowering.targets.qonnx import container_bits
from lowering_cases import SCHEMES, inputs, mixed_plan, ops, run, tiny
from tiny_models import Quirks, build


def _qdq(canonical, sites, plan):
    model = canonical.model.clone()
    QuantizeWeightsPass(plan, sites)(model)
    QuantizeActivationsPass(plan, sites)(model)
    return model


@pytest.mark.parametrize("scheme", SCHEMES)
def test_qonnx_pass_counts_numbers_idempotence(scheme):
    canonical, sites = tiny(build(Quirks()))
    plan = mixed_plan(sites, scheme)
    model = _qdq(canonical, sites, plan)
    before = ops(model)
    assert ToQonnxPass(plan, sites)(model).modified
    after = ops(model)
    groups = [len({container_bits(b, scheme) for b in plan.weights[layer.node]}) for layer in sites.layers]
    assert after["Quant"] == sum(groups) + len(sites.activations)  # one scalar-width Quant per width group
    assert not {"QuantizeLinear", "DequantizeLinear", "Clip"} & set(after)
    grouped = sum(g > 1 for g in groups)
    assert after - before == {"Quant": after["Quant"], "Gather": 2 * sum(g for g in groups if g > 1) + grouped,
                              "Concat": grouped}
    assert model.opset_imports[QONNX_DOMAIN] == 1
    proto = ir.serde.serialize_model(model)
    x = inputs()
    np.testing.assert_array_equal(run(qonnx_as_standard_ops(proto), x), run(simulate(canonical, plan, sites), x))
    assert not ToQonnxPass(plan, sites)(model).modified


def test_bitwidth_per_width_group_or_per_layer():
    canonical, sites = tiny(build(Quirks()))
    plan = mixed_plan(sites, "midrise-max", activations=False)
    per_channel = _qdq(canonical, sites, plan)
    ToQonnxPass(plan, sites)(per_channel)
    scalar = _qdq(canonical, sites, plan)
    ToQonnxPass(plan, sites, channel_bitwidth=False)(scalar)
    widths = [container_bits(b, "midrise-max") for b in plan.weights["conv1"]]
    quants = [n for n in per_channel.graph if n.op_type == "Quant" and n.name.startswith("conv1/")]
    got = {int(n.inputs[3].const_value.numpy()): n.inputs[0].producer().inputs[1].const_value.numpy().tolist()
           for n in quants}  # scalar width -> the kernels its Gather takes
    assert got == {w: [k for k, v in enumerate(widths) if v == w] for w in set(widths)}
    assert all(n.inputs[3].const_value.numpy().shape == () for n in per_channel.graph if n.op_type == "Quant")
    assert scalar.graph.initializers["conv1.w_bitwidth"].const_value.numpy().shape == ()
    assert float(scalar.graph.initializers["conv1.w_bitwidth"].const_value.numpy()) == max(widths)
    assert container_bits(1, "midrise-max") == 2 and container_bits(8, "midrise-max") == 9
    assert container_bits(1, "symmetric-rms") == 2 and container_bits(8, "symmetric-rms") == 8


def test_static_batch_fixes_the_batch_and_verify_still_runs_any_batch():
    from impq_onnx.lowering.lower import lower
    from impq_onnx.lowering.verify import verify

    canonical, sites = tiny(build(Quirks()))
    plan = mixed_plan(sites, "symmetric-rms")
    lowered = lower(canonical, plan, sites, format="qonnx", static_batch=2)
    for value in [*lowered.proto.graph.input, *lowered.proto.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_value == 2
    assert verify(lowered, canonical, plan, sites, [inputs()]).ok  # batches of 40 through the standard-op form

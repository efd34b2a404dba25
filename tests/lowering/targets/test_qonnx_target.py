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
    assert after["Quant"] == len(sites.layers) + len(sites.activations)
    assert not {"QuantizeLinear", "DequantizeLinear", "Clip"} & set(after)
    assert after - before == {"Quant": after["Quant"]}
    assert model.opset_imports[QONNX_DOMAIN] == 1
    proto = ir.serde.serialize_model(model)
    x = inputs()
    np.testing.assert_array_equal(run(qonnx_as_standard_ops(proto), x), run(simulate(canonical, plan, sites), x))
    assert not ToQonnxPass(plan, sites)(model).modified


def test_bitwidth_per_channel_or_per_layer():
    canonical, sites = tiny(build(Quirks()))
    plan = mixed_plan(sites, "midrise-max", activations=False)
    per_channel = _qdq(canonical, sites, plan)
    ToQonnxPass(plan, sites)(per_channel)
    scalar = _qdq(canonical, sites, plan)
    ToQonnxPass(plan, sites, channel_bitwidth=False)(scalar)
    widths = [container_bits(b, "midrise-max") for b in plan.weights["conv1"]]
    got = per_channel.graph.initializers["conv1.w_bitwidth"].const_value.numpy()
    assert got.shape == (4, 1, 1, 1) and list(got.reshape(-1)) == widths
    assert scalar.graph.initializers["conv1.w_bitwidth"].const_value.numpy().shape == ()
    assert float(scalar.graph.initializers["conv1.w_bitwidth"].const_value.numpy()) == max(widths)
    assert container_bits(1, "midrise-max") == 2 and container_bits(8, "midrise-max") == 9
    assert container_bits(1, "symmetric-rms") == 2 and container_bits(8, "symmetric-rms") == 8

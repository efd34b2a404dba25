"""SplitConvBiasPass: a quantized Conv's float bias moves into an Add; values stay bit-identical."""

from __future__ import annotations

import numpy as np

from impq_onnx.lowering.passes import QuantizeActivationsPass, QuantizeWeightsPass, SplitConvBiasPass
from impq_onnx.quant.simulate import simulate
from lowering_cases import inputs, mixed_plan, ops, run, tiny
from tiny_models import Quirks, build


def test_split_conv_bias_counts_numbers_idempotence():
    canonical, sites = tiny(build(Quirks(batchnorm=False)))  # conv1 has a bias, no batch-norm
    plan = mixed_plan(sites, "midrise-max")
    model = canonical.model.clone()
    QuantizeWeightsPass(plan, sites)(model)
    QuantizeActivationsPass(plan, sites)(model)
    before = ops(model)
    assert SplitConvBiasPass(plan, sites)(model).modified
    assert ops(model) - before == {"Add": 1}
    conv = next(node for node in model.graph if node.name == "conv1")
    assert len(conv.inputs) == 2
    assert "conv1.b_channels" in model.graph.initializers
    assert model.graph.initializers["conv1.b_channels"].const_value.numpy().shape == (1, 4, 1, 1)
    x = inputs()
    np.testing.assert_array_equal(run(model, x), run(simulate(canonical, plan, sites), x))
    assert not SplitConvBiasPass(plan, sites)(model).modified


def test_float_input_keeps_the_bias():
    canonical, sites = tiny(build(Quirks(batchnorm=False)))
    plan = mixed_plan(sites, "midrise-max", activations=False)
    model = canonical.model.clone()
    QuantizeWeightsPass(plan, sites)(model)
    assert not SplitConvBiasPass(plan, sites)(model).modified  # no int8 Conv pattern: nothing to protect

"""FakeQuant as standard ops: the same logits bit for bit as the training build's FakeQuant, no contrib op left."""

from __future__ import annotations

import numpy as np
import pytest
from lowering_cases import SCHEMES, inputs, mixed_plan, ops, run, tiny
from quant_models import tiny_cnn
from tiny_models import Quirks, build

from impq_onnx.quant.simulate import simulate
from impq_onnx.quant.standard_rounding import fake_quant_as_standard_ops, for_inference, runtime_has_fake_quant


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("model", [tiny_cnn, lambda: build(Quirks(head="matmul"))])
def test_standard_ops_equal_fake_quant(model, scheme):
    canonical, sites = tiny(model())
    simulated = simulate(canonical, mixed_plan(sites, scheme), sites)
    assert ops(simulated)["FakeQuant"] > 0
    standard = fake_quant_as_standard_ops(simulated)
    assert ops(standard)["FakeQuant"] == 0
    assert all(o.domain != "com.microsoft" for o in standard.opset_import)
    for seed in range(3):
        x = inputs(seed=seed)
        x[:4] = np.round(x[:4] * 8) / 8  # values on half steps of the small activation grids
        np.testing.assert_array_equal(run(standard, x), run(simulated, x))


def test_training_build_keeps_fake_quant():
    canonical, sites = tiny(tiny_cnn())
    simulated = simulate(canonical, mixed_plan(sites, "midrise-max"), sites)
    assert runtime_has_fake_quant()  # the project environment is the training build
    assert for_inference(simulated) is simulated

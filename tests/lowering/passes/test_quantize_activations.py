"""QuantizeActivationsPass: [Clip] -> QuantizeLinear -> DequantizeLinear equals the simulated quantizer."""

from __future__ import annotations

import numpy as np
import pytest

from impq_onnx.errors import PlanError
from impq_onnx.lowering.passes import QuantizeActivationsPass
from impq_onnx.quant.quantizers import activation_grid
from impq_onnx.quant.simulate import simulate
from lowering_cases import inputs, mixed_plan, ops, run, tiny
from quant_models import tiny_cnn
from tiny_models import Quirks, build


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("model", [tiny_cnn, lambda: build(Quirks(head="matmul"))])
def test_activation_pass_counts_numbers_idempotence(model, seed):
    canonical, sites = tiny(model())
    plan = mixed_plan(sites, "midrise-max", weights=False, seed=seed)
    lowered = canonical.model.clone()
    before = ops(lowered)
    assert QuantizeActivationsPass(plan, sites)(lowered).modified
    n = len(sites.activations)
    clips = sum(plan.activations[s.tensor] < 8 for s in sites.activations)
    assert ops(lowered) - before == {"QuantizeLinear": n, "DequantizeLinear": n, **({"Clip": clips} if clips else {})}
    x = inputs()
    np.testing.assert_array_equal(run(lowered, x), run(simulate(canonical, plan, sites), x))
    assert not QuantizeActivationsPass(plan, sites)(lowered).modified
    for site in sites.activations:
        q = next(v for v in (node.outputs[0] for node in lowered.graph) if v.name == f"{site.tensor}_quantized")
        assert q.dtype.name == ("UINT8" if site.unsigned else "INT8")


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_ties_round_half_to_even_like_the_simulation(bits):
    """Inputs exactly on half steps (and beyond the clip) give the simulation's integers."""
    canonical, sites = tiny(tiny_cnn())
    plan = mixed_plan(sites, "midrise-max", weights=False)
    plan.activations["x"] = bits  # the signed graph input, clip 2.5
    step, lo, hi = activation_grid(bits, 2.5, True)
    halves = (np.arange(lo - 3, hi + 3) + 0.5) * step
    x = np.resize(halves.astype(np.float32), (8, 3, 8, 8))
    lowered = canonical.model.clone()
    QuantizeActivationsPass(plan, sites)(lowered)
    np.testing.assert_array_equal(run(lowered, x), run(simulate(canonical, plan, sites), x))


def test_more_than_8_bits_needs_opset_21():
    canonical, sites = tiny(tiny_cnn(opset=17))
    plan = mixed_plan(sites, "midrise-max", weights=False)
    plan.activations["r1"] = 12
    with pytest.raises(PlanError, match=r"activations\['r1'\]: 12 bits need 16-bit QuantizeLinear"):
        QuantizeActivationsPass(plan, sites)(canonical.model.clone())
    canonical, sites = tiny(tiny_cnn(opset=21))
    lowered = canonical.model.clone()
    QuantizeActivationsPass(plan, sites)(lowered)
    x = inputs()
    np.testing.assert_array_equal(run(lowered, x), run(simulate(canonical, plan, sites), x))


def test_missing_clip_is_a_plan_error():
    canonical, sites = tiny(tiny_cnn())
    plan = mixed_plan(sites, "midrise-max", weights=False)
    plan.clips["x"] = type(plan.clips["x"])(None, True)
    with pytest.raises(PlanError, match=r"clips\['x'\]"):
        QuantizeActivationsPass(plan, sites)(canonical.model.clone())

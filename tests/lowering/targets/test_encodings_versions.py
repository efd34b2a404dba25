"""Encodings 0.6.1, 1.0.0 and 2.0.0: every file validates against its schema (written from the published
spec, tests/lowering/targets/schemas/), reproduces the simulation, and states no width the spec forbids."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from lowering_cases import SCHEMES, inputs, mixed_plan, tiny
from test_encodings_target import residual_model
from tiny_models import Quirks, build

from impq_onnx.errors import PlanError
from impq_onnx.lowering.lower import lower, read_lowered, write
from impq_onnx.lowering.verify import verify
from impq_onnx.quant.plan import PrecisionPlan

SCHEMAS = Path(__file__).parent / "schemas"
VERSIONS = ("0.6.1", "1.0.0", "2.0.0")


def _validate(encodings: dict, version: str) -> None:
    schema = json.loads((SCHEMAS / f"aimet-encodings-{version}.schema.json").read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)
    jsonschema.validate(encodings, schema, cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("model", [residual_model, lambda: build(Quirks(head="matmul"))])
def test_every_version_validates_and_equals_the_simulation(tmp_path, model, scheme, version):
    canonical, sites = tiny(model())
    plan = mixed_plan(sites, scheme, float_kernel=False)  # per-kernel bits 1..8, activations 1..8
    lowered = lower(canonical, plan, sites, format="encodings", encodings_version=version)
    _validate(lowered.encodings, version)
    write(lowered, tmp_path / "m.onnx")
    back = read_lowered(tmp_path / "m.onnx")
    result = verify(back, canonical, plan, sites, [inputs(seed=s) for s in range(2)])
    assert result.ok and result.agreement == 1.0 and result.max_logit_diff == 0.0, result


def test_061_widens_below_4_bits_and_keeps_the_true_width_of_symmetric_kernels():
    canonical, sites = tiny(residual_model())
    plan = mixed_plan(sites, "symmetric-rms", float_kernel=False)
    encodings = lower(canonical, plan, sites, format="encodings").encodings
    for layer in sites.layers:
        widths = [e["bitwidth"] for e in encodings["param_encodings"][layer.weight]]
        assert widths == [max(4, b) for b in plan.weights[layer.node]]  # the true B, widened to the spec's 4
    args = encodings["quantizer_args"]
    assert isinstance(args["activation_bitwidth"], int) and args["per_channel_quantization"] == "True"


def test_200_states_2_bit_midrise_at_its_true_width_with_the_custom_grid():
    canonical, sites = tiny(residual_model())
    plan = mixed_plan(sites, "midrise-max", float_kernel=False)
    layer = sites.layers[1]
    plan.weights[layer.node] = [1, 2] * (layer.kernels // 2) + [2] * (layer.kernels % 2)
    lowered = lower(canonical, plan, sites, format="encodings", encodings_version="2.0.0")
    entry = next(e for e in lowered.encodings["encodings"] if e["name"] == layer.weight)
    assert entry["output_dtype"] == "int2" and set(entry["y_zero_point"]) == {-0.5}
    steps = np.array(lowered.sidecar["weights"][layer.node]["scale"], np.float32) * 2
    np.testing.assert_array_equal(np.array(entry["y_scale"], np.float32), steps)
    assert verify(lowered, canonical, plan, sites, [inputs()]).ok


@pytest.mark.parametrize("version", ["1.0.0", "2.0.0"])
def test_float_kernel_in_a_quantized_layer_is_a_one_line_error(version):
    canonical, sites = tiny(residual_model())
    plan = mixed_plan(sites, "midrise-max")  # one float kernel in the second layer
    with pytest.raises(PlanError, match=f"encodings {version}: '.*' mixes float and integer kernels") as info:
        lower(canonical, plan, sites, format="encodings", encodings_version=version)
    assert "\n" not in str(info.value)
    assert lower(canonical, plan, sites, format="encodings").encodings is not None  # 0.6.1 states float channels


def test_unknown_version_is_a_plan_error():
    canonical, sites = tiny(residual_model())
    plan = PrecisionPlan.uniform(sites, 4, 8, default_clip=2.0)
    with pytest.raises(PlanError, match="encodings_version '3.0' is unknown"):
        lower(canonical, plan, sites, format="encodings", encodings_version="3.0")

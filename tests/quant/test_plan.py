"""PrecisionPlan: construction, validation one-liners, deterministic YAML/JSON, metrics by hand."""

from __future__ import annotations

import math

import pytest

from impq_onnx.errors import PlanError
from impq_onnx.quant.plan import ActivationClip, PrecisionPlan
from impq_onnx.frontend.sites import ActivationSite, BatchNormStats, QuantLayer, SiteTable


def _sites() -> SiteTable:
    bn = BatchNormStats("bn", gamma=(1.0, 0.5), beta=(0.0, 1.0))  # clip = max(6, 4) = 6
    conv = QuantLayer("conv", "Conv", "conv.w", (2, 3, 3, 3), 0, None, "x", "c", 2, 1, 27, 2 * 27 * 16, bn)
    fc = QuantLayer("fc", "Gemm", "fc.w", (3, 2), 0, "fc.b", "h", "logits", 3, 1, 2, 6, None)
    return SiteTable(
        input_name="x", input_shape=(1, 3, 4, 4), logits="logits", layers=(conv, fc),
        activations=(
            ActivationSite("x", ("conv",), 48, (3, 4, 4), None, None, False),
            ActivationSite("h", ("fc",), 2, (2,), "Relu", bn, True),
        ),
    )


def test_uniform_fills_every_kernel_and_clip():
    sites = _sites()
    plan = PrecisionPlan.uniform(sites, 4, 8)
    assert plan.weights == {"conv": [4, 4], "fc": [4, 4, 4]}
    assert plan.activations == {"x": 8, "h": 8}
    assert plan.clips["h"] == ActivationClip(6.0, signed=False)
    assert plan.clips["x"] == ActivationClip(None, signed=True)  # no batch-norm: calibrate later


def test_yaml_and_json_round_trip_byte_deterministic():
    sites = _sites()
    plan = PrecisionPlan.uniform(sites, 4, None, default_clip=2.5)
    plan.weights["fc"] = [1, None, 16]
    for dump, load in ((PrecisionPlan.to_yaml, PrecisionPlan.from_yaml), (PrecisionPlan.to_json, PrecisionPlan.from_json)):
        text = dump(plan)
        again = load(text)
        assert again == plan
        assert dump(again) == text
    assert "schema_version: 1" in plan.to_yaml()
    assert '"schema_version": 1' in plan.to_json()
    # insertion order does not leak into the file
    shuffled = PrecisionPlan(dict(reversed(plan.weights.items())), dict(reversed(plan.activations.items())),
                             dict(reversed(plan.clips.items())))
    assert shuffled.to_yaml() == plan.to_yaml()


def test_save_and_load(tmp_path):
    plan = PrecisionPlan.uniform(_sites(), 3)
    for name in ("p.yaml", "p.json"):
        plan.save(tmp_path / name)
        assert PrecisionPlan.load(tmp_path / name) == plan


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p.weights.update(nope=[4]), "layer 'nope' is not a quantizable layer"),
        (lambda p: p.weights.update(conv=[4, 17]), "weights['conv'][1]: bits must be an int in 1..16"),
        (lambda p: p.weights.update(conv=[0, 4]), "weights['conv'][0]"),
        (lambda p: p.weights.update(conv=[4, 4, 4]), "weights['conv'] lists 3 kernels, the layer has 2"),
        (lambda p: p.activations.update(x=2.5), "activations['x']"),
        (lambda p: p.activations.update(y=4), "tensor 'y' is not an activation site"),
        (lambda p: setattr(p, "weight_scheme", "fancy"), "weight_scheme 'fancy' is unknown"),
        (lambda p: setattr(p, "activation_scheme", "x"), "activation_scheme 'x' is unknown"),
        (lambda p: p.weights.pop("fc"), "layer 'fc' is missing"),
    ],
)
def test_validate_names_the_fault_in_one_line(edit, message):
    plan = PrecisionPlan.uniform(_sites(), 4)
    edit(plan)
    with pytest.raises(PlanError) as info:
        plan.validate(_sites())
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_files_are_checked_when_read():
    text = PrecisionPlan.uniform(_sites(), 4).to_yaml()
    with pytest.raises(PlanError, match="unknown key 'weightz'.*did you mean 'weights'"):
        PrecisionPlan.from_yaml(text.replace("weights:", "weightz:"))
    with pytest.raises(PlanError, match="schema_version must be 1"):
        PrecisionPlan.from_yaml(text.replace("schema_version: 1", "schema_version: 2"))
    with pytest.raises(PlanError, match="not valid YAML"):
        PrecisionPlan.from_yaml("weights: [")
    with pytest.raises(PlanError):  # safe_load: no arbitrary Python objects
        PrecisionPlan.from_yaml("!!python/object/apply:os.system ['true']")
    with pytest.raises(PlanError, match="not valid JSON"):
        PrecisionPlan.from_json("{")


def test_effective_bits_and_bitops_by_hand():
    sites = _sites()
    plan = PrecisionPlan.uniform(sites, 4, None)
    plan.weights["conv"] = [2, 6]  # 27 params each
    plan.weights["fc"] = [1, None, 3]  # 2 params each; None counts 32
    plan.activations["x"] = 8  # 48 elements; "h" float (32), 2 elements
    assert plan.weight_bits_effective(sites) == pytest.approx((27 * 2 + 27 * 6 + 2 * (1 + 32 + 3)) / 60)
    assert plan.activation_bits_effective(sites) == pytest.approx((48 * 8 + 2 * 32) / 50)
    assert plan.compression_ratio(sites) == pytest.approx(16 / plan.weight_bits_effective(sites))
    n_conv, n_fc = 27 * 16, 2  # MACs per kernel
    expected = sum(n_conv * (b * 8 + b + 8 + math.log2(27)) for b in (2, 6))
    expected += sum(n_fc * (b * 32 + b + 32 + math.log2(2)) for b in (1, 32, 3))
    assert plan.bitops(sites) == pytest.approx(expected / 1e9)


def test_group_bits_follow_granularity():
    sites = _sites()
    plan = PrecisionPlan.uniform(sites, 4)
    layer_group = sites.weight_groups("layer")[1]
    plan.set_group_bits(layer_group, 2)
    assert plan.weights["fc"] == [2, 2, 2] and plan.group_bits(layer_group) == 2
    kernel_group = sites.weight_groups("kernel")[0]
    plan.set_group_bits(kernel_group, None)
    assert plan.weights["conv"] == [None, 4] and plan.group_bits(kernel_group) is None
    with pytest.raises(PlanError):
        plan.set_group_bits(kernel_group, 0)

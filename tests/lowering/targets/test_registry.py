"""The output-target registry: a new format is one Target subclass and one register line.

The toy target below lives only in this file: it folds every weight DequantizeLinear into on-grid float
values (found by structure), keeps the activation QDQ chains, and writes the per-kernel scales to a
``<out>.scales`` JSON. lower, write, read_lowered, verify and the compress options take it without any change
elsewhere.
"""

from __future__ import annotations

import click
import numpy as np
import onnx_ir as ir
import pytest

from impq_onnx import compress_config, compression
from impq_onnx.cli import lower_command
from impq_onnx.errors import ConfigError
from impq_onnx.lowering.lower import lower, read_lowered, write
from impq_onnx.lowering.patterns import weight_quantizers
from impq_onnx.lowering.targets import QdqTarget, Target, get_target, register, target_names, unregister
from impq_onnx.lowering.verify import verify
from lowering_cases import inputs, mixed_plan, ops, tiny
from tiny_models import Quirks, build


class FoldedWeightsTarget(Target):
    name = "folded-weights"
    help = "on-grid float weights, QDQ activations, scales JSON"
    stores_codes = False
    attachments = (".scales",)

    def rewrite(self, model, plan, sites, **options) -> dict[str, dict]:
        scales = {}
        for match in weight_quantizers(model.graph):
            codes, scale, _, _ = match.arrays()
            name = match.codes.name
            folded = ir.Value(name=name, const_value=ir.tensor((codes.astype(np.float32) * scale).astype(np.float32)))
            model.graph.initializers.pop(name)
            match.dequantize.outputs[0].replace_all_uses_with(folded)
            model.graph.remove(match.dequantize, safe=True)
            model.graph.register_initializer(folded)
            scales[name] = [float(s) for s in scale.reshape(-1)]
        return {".scales": scales}

    def weight_scales(self, lowered, entry, array) -> np.ndarray:
        return np.array(lowered.attachments[".scales"][entry["tensor"]], np.float32)

    def activation_range(self, lowered, site, entry, array):
        return QdqTarget.activation_range(self, lowered, site, entry, array)  # the activations are QDQ


@pytest.fixture
def folded_target():
    target = register(FoldedWeightsTarget())
    yield target
    unregister(target.name)


def test_a_target_registered_here_lowers_writes_reads_back_and_verifies(tmp_path, folded_target):
    canonical, sites = tiny(build(Quirks()))
    plan = mixed_plan(sites, "midrise-max", seed=2)
    assert target_names()[-1] == "folded-weights" and get_target("folded-weights") is folded_target
    lowered = lower(canonical, plan, sites, format="folded-weights")
    counts = ops(lowered.proto)
    assert counts["DequantizeLinear"] == counts["QuantizeLinear"] == len(sites.activations)
    result = verify(lowered, canonical, plan, sites, [inputs()])
    assert result.ok and result.max_logit_diff == 0.0, result.to_dict()
    paths = write(lowered, tmp_path / "m.onnx")
    assert [p.name for p in paths] == ["m.onnx", "m.onnx.bits.json", "m.scales"]
    again = read_lowered(tmp_path / "m.onnx")
    assert again.format == "folded-weights" and again.attachments == lowered.attachments
    assert verify(again, canonical, plan, sites, [inputs()]).ok


def test_compress_accepts_a_registered_target_and_only_while_registered(folded_target):
    assert compression.CompressConfig.resolve(model="m.onnx", data="d", format="folded-weights").format == (
        "folded-weights")
    unregister(folded_target.name)
    with pytest.raises(ConfigError, match="option 'format': 'folded-weights' is not one of qdq, qonnx, encodings"):
        compression.CompressConfig.resolve(model="m.onnx", data="d", format="folded-weights")
    register(folded_target)


def test_verify_catches_a_wrong_scale_in_the_new_target(folded_target):
    canonical, sites = tiny(build(Quirks()))
    plan = mixed_plan(sites, "midrise-max", seed=2)
    lowered = lower(canonical, plan, sites, format="folded-weights")
    name = lowered.sidecar["weights"]["conv1"]["tensor"]
    lowered.attachments[".scales"][name][0] *= 2
    result = verify(lowered, canonical, plan, sites, [inputs()])
    assert not result.ok and any(name in m for m in result.record_mismatches + result.range_violations)


def test_choices_come_from_the_registry():
    option = next(p for p in lower_command.params if p.name == "format_")
    assert isinstance(option.type, click.Choice)
    assert tuple(option.type.choices) == tuple(compress_config._CHOICES["format"]) == target_names()
    assert target_names()[:3] == ("qdq", "qonnx", "encodings") and {"packed", "qdq-int4", "ort"} <= set(target_names())
    with pytest.raises(ConfigError, match="format 'tflite' is unknown; use one of qdq, qonnx, encodings"):
        get_target("tflite")
    with pytest.raises(ValueError, match="registered already"):
        register(QdqTarget())

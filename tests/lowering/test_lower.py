"""lower(): every format reproduces the simulation, the plan reads back, files are written atomically."""

from __future__ import annotations

import json
import os

import onnx
import pytest

from impq_onnx.errors import ConfigError, PlanError
from impq_onnx.lowering.lower import lower, lower_file, read_plan_from_annotation, sidecar_path, target_names, write
from impq_onnx.lowering.verify import verify
from lowering_cases import SCHEMES, inputs, mixed_plan, ops, tiny
from quant_models import tiny_cnn
from tiny_models import Quirks, build


@pytest.mark.parametrize("quirks", [Quirks(head="matmul"), Quirks(batchnorm=False)], ids=["bn-matmul", "bias-gemm"])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("format", [f for f in target_names() if f != "ort"])  # ort: 8-bit plans (test_ort_target)
def test_every_format_matches_the_simulation_and_round_trips(format, scheme, quirks):
    canonical, sites = tiny(build(quirks))
    plan = mixed_plan(sites, scheme, seed=2)
    lowered = lower(canonical, plan, sites, format=format)
    result = verify(lowered, canonical, plan, sites, [inputs(seed=s) for s in range(2)])
    assert result.ok, result.to_dict()
    assert result.max_logit_diff == 0.0
    assert read_plan_from_annotation(lowered.proto) == plan
    assert "dw.w" in canonical.model.graph.initializers  # the input model is untouched


def test_qdq_graph_shape():
    canonical, sites = tiny(tiny_cnn())
    plan = mixed_plan(sites, "midrise-max")
    lowered = lower(canonical, plan, sites)
    counts = ops(lowered.proto)
    assert counts["QuantizeLinear"] == len(sites.activations)
    assert counts["DequantizeLinear"] == len(sites.activations) + len(sites.layers)
    assert counts["BatchNormalization"] == 2  # kept, not folded
    onnx.checker.check_model(lowered.proto, full_check=True)


def test_sidecar_is_self_contained_json(tmp_path):
    canonical, sites = tiny(tiny_cnn())
    plan = mixed_plan(sites, "midrise-max")
    paths = write(lower(canonical, plan, sites), tmp_path / "m.onnx")
    assert paths == [tmp_path / "m.onnx", sidecar_path(tmp_path / "m.onnx")]
    data = json.loads(sidecar_path(tmp_path / "m.onnx").read_text())
    assert data["schema"] == "impq-onnx/bits" and data["schema_version"] == 1 and data["model"] == "m.onnx"
    conv2 = data["weights"]["conv2"]
    assert conv2["bits"] == plan.weights["conv2"] and len(conv2["scale"]) == len(conv2["bits"])
    assert conv2["tensor"] == "conv2.w_quantized" and conv2["dtype"] == "int32"  # an 8-bit midrise kernel
    assert data["activations"]["r1"]["bits"] == plan.activations["r1"]
    assert data["activations"]["r1"]["clip"] == plan.clips["r1"].value
    assert oct(os.stat(tmp_path / "m.onnx").st_mode & 0o777) != oct(0o600)


def test_write_leaves_nothing_on_error(tmp_path, monkeypatch):
    canonical, sites = tiny(tiny_cnn())
    lowered = lower(canonical, mixed_plan(sites, "midrise-max"), sites)
    (tmp_path / "m.onnx").write_bytes(b"old")
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        write(lowered, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == b"old"


def test_lower_file(tmp_path):
    canonical, sites = tiny(tiny_cnn())
    plan = mixed_plan(sites, "symmetric-rms")
    onnx.save(tiny_cnn(), tmp_path / "in.onnx")
    plan.save(tmp_path / "plan.yaml")
    paths = lower_file(tmp_path / "in.onnx", tmp_path / "plan.yaml", tmp_path / "out.onnx", format="encodings")
    assert [p.name for p in paths] == ["out.onnx", "out.onnx.bits.json", "out.encodings"]
    model = onnx.load(tmp_path / "out.onnx")
    assert read_plan_from_annotation(model) == plan
    encodings = json.loads((tmp_path / "out.encodings").read_text())
    # a site the version widens (below 4 bits in 0.6.1) is keyed by its kept Clip's output, <site>_layer_input
    assert {k.removesuffix("_layer_input") for k in encodings["activation_encodings"]} >= {"r1", "f"}


def test_unknown_format_and_wide_activation_are_plan_errors():
    canonical, sites = tiny(tiny_cnn(opset=17))
    plan = mixed_plan(sites, "midrise-max")
    with pytest.raises(ConfigError, match="format 'tflite' is unknown"):
        lower(canonical, plan, sites, format="tflite")
    plan.activations["f"] = 9
    with pytest.raises(PlanError, match=r"activations\['f'\]: 9 bits"):
        lower(canonical, plan, sites)


def test_wide_kernels_up_to_16_bits():
    canonical, sites = tiny(tiny_cnn())
    plan = mixed_plan(sites, "midrise-max")
    plan.weights["conv1"][2] = 16
    plan.weights["fc"][1] = 11
    lowered = lower(canonical, plan, sites)
    result = verify(lowered, canonical, plan, sites, [inputs()])
    assert result.ok, result.to_dict()
    assert lowered.sidecar["weights"]["conv1"]["code_max"][2] == 2**16 - 1

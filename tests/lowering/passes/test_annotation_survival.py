"""The impq.* annotation survives onnxruntime's optimized-model output and onnx.version_converter; no warnings.

Both rewriters drop ``graph.quantization_annotation`` and keep ``metadata_props``; the plan must read back
from what they write. Loading a lowered model must not make onnxruntime log "Removing initializer".
"""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
from lowering_cases import SCHEMES, mixed_plan, tiny
from onnx import version_converter
from quant_models import tiny_cnn

from impq_onnx.lowering.lower import lower, read_plan_from_annotation


def _lowered(scheme: str, format: str = "qdq"):
    canonical, sites = tiny(tiny_cnn())
    plan = mixed_plan(sites, scheme)
    plan.activations[sites.activations[0].tensor] = None
    return plan, lower(canonical, plan, sites, format=format).proto


@pytest.mark.parametrize("level", [ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   ort.GraphOptimizationLevel.ORT_ENABLE_ALL])
def test_annotation_survives_onnxruntime_optimized_model(tmp_path, level):
    plan, proto = _lowered("midrise-max")
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert len(optimized.graph.node) != len(proto.graph.node) or level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert read_plan_from_annotation(optimized) == plan


@pytest.mark.parametrize("scheme", SCHEMES)
def test_annotation_survives_version_converter(scheme):
    plan, proto = _lowered(scheme)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    converted = version_converter.convert_version(proto, opset + 2)
    assert next(o.version for o in converted.opset_import if o.domain in ("", "ai.onnx")) == opset + 2
    assert not converted.graph.quantization_annotation  # what the converter drops; metadata_props carries it
    assert read_plan_from_annotation(converted) == plan


@pytest.mark.parametrize("format", ["qdq", "qonnx", "encodings"])
def test_no_unused_initializers_and_no_load_warnings(capfd, format):
    _, proto = _lowered("symmetric-rms", format)
    used = {name for node in proto.graph.node for name in node.input}
    assert [t.name for t in proto.graph.initializer if t.name not in used] == []
    if format == "qonnx":
        return  # onnxruntime cannot load the QONNX custom op; the initializer check above is what matters
    options = ort.SessionOptions()
    options.log_severity_level = 2  # the default: warnings ("Removing initializer ... not used") are printed
    capfd.readouterr()
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    captured = capfd.readouterr()
    assert "Removing initializer" not in captured.err + captured.out

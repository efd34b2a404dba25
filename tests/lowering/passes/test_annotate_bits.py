"""AnnotateBitsPass: impq.* annotations for every kernel and activation; the plan reads back unchanged."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from impq_onnx.lowering.passes import AnnotateBitsPass, QuantizeActivationsPass, QuantizeWeightsPass
from impq_onnx.lowering.passes.annotate_bits import (
    ANNOTATION_KEY,
    SUMMARY_KEY,
    annotated_bits,
    annotations,
    compact_annotation,
    expand_annotation,
    read_plan_from_annotation,
)
from lowering_cases import SCHEMES, inputs, mixed_plan, ops, run, tiny
from quant_models import tiny_cnn
from tiny_models import Quirks, build


def _lowered(canonical, sites, plan):
    model = canonical.model.clone()
    QuantizeWeightsPass(plan, sites)(model)
    QuantizeActivationsPass(plan, sites)(model)
    return model


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("model", [tiny_cnn, lambda: build(Quirks(head="matmul"))])
def test_annotation_round_trip(model, scheme):
    canonical, sites = tiny(model())
    plan = mixed_plan(sites, scheme)
    plan.activations[sites.activations[0].tensor] = None  # a float site is annotated too
    lowered = _lowered(canonical, sites, plan)
    before, x = ops(lowered), inputs()
    logits = run(lowered, x)
    assert AnnotateBitsPass(plan, sites)(lowered).modified
    assert ops(lowered) == before
    np.testing.assert_array_equal(run(lowered, x), logits)
    notes = annotations(lowered)
    assert len(notes) == len(sites.layers) + len(sites.activations)
    assert SUMMARY_KEY in lowered.metadata_props
    assert read_plan_from_annotation(lowered) == plan
    proto = ir.serde.serialize_model(lowered)
    assert read_plan_from_annotation(proto) == plan
    assert read_plan_from_annotation(ir.serde.deserialize_model(proto)) == plan
    assert not AnnotateBitsPass(plan, sites)(lowered).modified


def test_annotation_points_at_stored_integers_with_literal_bits():
    canonical, sites = tiny(tiny_cnn())
    plan = mixed_plan(sites, "midrise-max")
    lowered = _lowered(canonical, sites, plan)
    AnnotateBitsPass(plan, sites)(lowered)
    notes = annotations(lowered)
    entry = notes["conv2.w_quantized"]
    assert entry["impq.kind"] == "weight" and entry["impq.layer"] == "conv2" and entry["impq.axis"] == "0"
    assert annotated_bits(entry) == plan.weights["conv2"]
    assert not any("impq" in name for name in lowered.graph.initializers)  # literals only: no unused initializer
    assert entry["impq.scale"] == "conv2.w_scale"
    act = notes["r1_quantized"]
    assert act["impq.site"] == "r1" and act["impq.signed"] == "false" and float(act["impq.clip"]) == plan.clips["r1"].value


def test_changed_plan_updates_the_annotation():
    canonical, sites = tiny(tiny_cnn())
    plan = mixed_plan(sites, "midrise-max")
    lowered = _lowered(canonical, sites, plan)
    AnnotateBitsPass(plan, sites)(lowered)
    other = plan.copy()
    other.granularity = "layer"
    assert AnnotateBitsPass(other, sites)(lowered).modified
    assert read_plan_from_annotation(lowered).granularity == "layer"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compact_annotation_expands_to_the_same_entries_and_the_same_plan(scheme):
    canonical, sites = tiny(build(Quirks(head="matmul")))
    plan = mixed_plan(sites, scheme, seed=2)  # per-kernel widths 1-8, a float kernel, 1-8-bit sites
    lowered = _lowered(canonical, sites, plan)
    AnnotateBitsPass(plan, sites)(lowered)
    notes = annotations(lowered)
    compact = compact_annotation(notes)
    assert expand_annotation(compact) == notes
    wide = {t: dict(e, **{"impq.bits": "2,2,2,10,35,0,2"}) for t, e in notes.items()}  # widths past 9: base 36
    assert expand_annotation(compact_annotation(wide)) == wide
    proto = ir.serde.serialize_model(lowered)
    del proto.graph.quantization_annotation[:]
    for prop in proto.metadata_props:
        if prop.key == ANNOTATION_KEY:
            prop.value = json.dumps(compact)
    assert annotations(proto) == notes and read_plan_from_annotation(proto) == plan
    assert len(json.dumps(compact)) < 0.8 * len(json.dumps(notes))  # 0.72 here; ResNet-20: 0.33

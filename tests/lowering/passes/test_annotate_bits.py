"""AnnotateBitsPass: impq.* annotations for every kernel and activation; the plan reads back unchanged."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from impq_onnx.errors import ModelError
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


def _entry(kind: str, bits: str, **keys: str) -> dict[str, str]:
    return {"impq.kind": kind, "impq.bits": bits, **{f"impq.{k}": v for k, v in keys.items()}}


# Weights and activations whose names follow the lowering's naming, and ones that do not.
NOTES = {
    "a.weight_quantized": _entry("weight", "2,3", layer="a", axis="0", scale="a.weight_scale",
                                 zero_point="a.weight_zero_point", scheme="midrise-max"),
    "b.weight_quantized": _entry("weight", "1,1", layer="b", axis="0", scale="b.weight_scale",
                                 zero_point="b.weight_zero_point", scheme="midrise-max"),
    "c.weight": _entry("weight", "0,0", layer="conv_c", axis="0", scheme="midrise-max"),  # float: no scale
    "d.weight_quantized": _entry("weight", "4", layer="d", axis="1", scheme="midrise-max"),  # suffix, no scale
    "e_quantized": _entry("weight", "8", layer="e_node", axis="0", scale="other", scheme="midrise-max"),
    "x_quantized": _entry("activation", "8", site="x", scale="x_scale", zero_point="x_zero_point", clip="null",
                          signed="false", scheme="uniform-clip"),
    "y": _entry("activation", "0", site="y", clip="2.5", signed="true", scheme="uniform-clip"),
    "z": _entry("activation", "0", site="w", clip="null", signed="false", scheme="uniform-clip"),
}


def test_compact_annotation_leaves_out_what_the_names_and_the_node_give_and_expands_exactly():
    widths = {"a.weight_scale": "2,3", "b.weight_scale": "1,1"}  # the UnpackBits node's, keyed by scale
    compact = compact_annotation(NOTES, widths)
    assert expand_annotation(compact, widths) == NOTES
    assert expand_annotation(compact_annotation(NOTES)) == NOTES  # no node: every width annotated
    weights = compact["weight"]
    assert weights["implied"] == 2 and {"a.weight_quantized", "b.weight_quantized"}.isdisjoint(weights["tensors"])
    assert "bits" not in json.dumps(weights["common"]) and weights["tensors"]["e_quantized"]["scale"] == "other"
    assert weights["tensors"]["d.weight_quantized"]["scale"] is None  # lacks the scale its name implies
    assert compact["activation"]["tensors"]["x_quantized"] == {"bits": "8"}  # site, scale, zero point: its name's
    assert compact["activation"]["tensors"]["z"] == {"site": "w"}
    for node in ({}, {"b.weight_scale": "1,1"}):  # the node missing, or with fewer weights: said so
        with pytest.raises(ModelError, match="2 weight entries are implied by the model's UnpackBits node"):
            expand_annotation(compact, node)
    del compact["weight"]["tensors"]["e_quantized"]["bits"]
    with pytest.raises(ModelError, match="'e_quantized'.*UnpackBits"):
        expand_annotation(compact, widths)


def test_weights_of_the_node_are_implied_only_when_every_one_has_an_entry():
    widths = {"a.weight_scale": "2,3", "b.weight_scale": "1,1", "f.weight_scale": "2"}  # f: not annotated
    compact = compact_annotation(NOTES, widths)
    assert "implied" not in compact["weight"] and "b.weight_quantized" in compact["weight"]["tensors"]
    assert expand_annotation(compact, widths) == NOTES  # no entry invented for f

"""verify(): passes on a faithful lowering and names each kind of unfaithfulness."""

from __future__ import annotations

import copy
import json

import numpy as np
from onnx import numpy_helper

from impq_onnx.lowering.lower import lower
from impq_onnx.lowering.passes.annotate_bits import ANNOTATION_KEY
from impq_onnx.lowering.verify import verify
from lowering_cases import inputs, mixed_plan, tiny
from quant_models import tiny_cnn


def _case():
    canonical, sites = tiny(tiny_cnn())
    plan = mixed_plan(sites, "midrise-max")
    return canonical, sites, plan, lower(canonical, plan, sites)


def _set(proto, name, fn):
    for i, t in enumerate(proto.graph.initializer):
        if t.name == name:
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t).copy()), name))
            return
    raise KeyError(name)


def test_faithful_lowering_passes():
    canonical, sites, plan, lowered = _case()
    result = verify(lowered, canonical, plan, sites, [inputs(seed=s) for s in range(3)])
    assert result.ok and result.samples == 120 and result.agreement == 1.0 and result.max_logit_diff == 0.0


def test_out_of_range_code_is_reported():
    canonical, sites, plan, lowered = _case()
    k = plan.weights["conv1"].index(1)

    def widen(codes):
        codes[k].flat[0] = 3  # a 1-bit kernel may only hold -1 and +1
        return codes

    _set(lowered.proto, "conv1.w_quantized", widen)
    result = verify(lowered, canonical, plan, sites, [inputs()])
    assert not result.ok
    assert any(f"kernel {k}" in v for v in result.range_violations)


def test_widened_activation_range_is_reported():
    canonical, sites, plan, lowered = _case()
    plan.activations["r1"] = 3
    lowered = lower(canonical, plan, sites)
    _set(lowered.proto, "r1_clip_max", lambda v: v * 2)
    result = verify(lowered, canonical, plan, sites, [inputs()])
    assert any("activation 'r1': integer range" in v for v in result.range_violations)


def test_sidecar_and_annotation_disagreement_is_reported():
    canonical, sites, plan, lowered = _case()
    bad = copy.deepcopy(lowered)
    bad.sidecar["weights"]["fc"]["scale"][0] *= 2
    assert any("scales of 'fc.w_quantized'" in m for m in verify(bad, canonical, plan, sites, [inputs()]).record_mismatches)
    bad = copy.deepcopy(lowered)
    meta = next(p for p in bad.proto.metadata_props if p.key == ANNOTATION_KEY)
    record = json.loads(meta.value)
    record["conv2.w_quantized"]["impq.bits"] = ",".join(str(min(int(b) + 1, 8)) for b in
                                                         record["conv2.w_quantized"]["impq.bits"].split(","))
    meta.value = json.dumps(record)
    assert any("bits of 'conv2.w_quantized'" in m for m in verify(bad, canonical, plan, sites, [inputs()]).record_mismatches)


def test_numeric_disagreement_is_reported():
    canonical, sites, plan, lowered = _case()
    _set(lowered.proto, "fc.w_scale", lambda v: v * np.float32(1.5))
    result = verify(lowered, canonical, plan, sites, [inputs(seed=s) for s in range(3)])
    assert result.max_logit_diff > 0 and not result.ok

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


# Rounding ties: the lowered model may compute a site's input in another float order than the simulation.
def _uniform_case():
    from impq_onnx.quant.plan import PrecisionPlan

    canonical, sites = tiny(tiny_cnn())
    plan = PrecisionPlan.uniform(sites, 8, 8, default_clip=4.0)  # input grid: step 1/32, a power of two
    return canonical, sites, plan, lower(canonical, plan, sites)


def _scale_input(proto, factor: float) -> None:
    """The lowered model multiplies its input by ``factor`` before quantizing it (the simulation does not)."""
    from onnx import helper

    quantize = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    quantize.input[0] = "x_rescaled"
    proto.graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), "x_factor"))
    proto.graph.node.insert(0, helper.make_node("Mul", ["x", "x_factor"], ["x_rescaled"], name="rescale"))


def _tie_inputs() -> np.ndarray:
    """Inputs off the grid, but for one value per sample that lies exactly half-way between two codes
    (an even code and the next: half to even keeps the even one, anything above it takes the next)."""
    x = inputs(seed=5)
    x[:, 0, 0, 0] = (np.arange(len(x)) % 8 * 2 + 0.5) / np.float32(32)
    return x


def test_exact_lowering_has_no_tie_flips():
    canonical, sites, plan, lowered = _uniform_case()
    result = verify(lowered, canonical, plan, sites, [_tie_inputs()])
    assert result.ok and result.tie_flips == 0 and result.max_logit_diff == 0.0


def test_a_code_flipped_at_a_rounding_tie_passes():
    # One ulp more at the input (what a reordered float sum gives): each tie rounds up instead of to even,
    # and every later site and the logits move with it; judged site by site, only the ties differ.
    canonical, sites, plan, lowered = _uniform_case()
    _scale_input(lowered.proto, 1 + 2.0**-23)
    result = verify(lowered, canonical, plan, sites, [_tie_inputs()])
    assert result.ok, result.record_mismatches
    assert result.tie_flips == 40 and result.max_logit_diff > 0 and result.agreement == 1.0


def test_a_graph_change_beyond_a_tie_is_reported():
    canonical, sites, plan, lowered = _uniform_case()
    _scale_input(lowered.proto, 1.01)
    result = verify(lowered, canonical, plan, sites, [_tie_inputs()])
    assert not result.ok
    assert any(m.startswith("activation 'x': code ") and "not a rounding tie" in m for m in result.record_mismatches)


def test_a_tampered_weight_code_is_reported():
    canonical, sites, plan, lowered = _uniform_case()

    def nudge(codes):
        codes.flat[0] -= 2 * np.sign(codes.flat[0])  # the next odd code towards 0: still on the midrise grid
        return codes

    _set(lowered.proto, "conv2.w_quantized", nudge)
    result = verify(lowered, canonical, plan, sites, [_tie_inputs()])
    assert not result.ok and not result.range_violations
    assert any("conv2" in m for m in result.record_mismatches)
    assert any(m.startswith("activation 'f': code ") for m in result.record_mismatches)


def test_a_tampered_activation_scale_is_reported():
    canonical, sites, plan, lowered = _uniform_case()
    _set(lowered.proto, "r1_scale", lambda v: v * np.float32(1.25))
    result = verify(lowered, canonical, plan, sites, [_tie_inputs()])
    assert not result.ok
    assert any("'r1'" in m and "scale" in m for m in result.record_mismatches)
    assert any(m.startswith("activation 'r1': code ") for m in result.record_mismatches)

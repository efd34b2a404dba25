"""Learned activation clips (``act_clip: learned``): the learned quantizer, its round trip through the plan, and
real onnxruntime-training fine-tunes that train it (the tiny CNN and its quadrant task)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper
from quant_models import canonical_and_sites, quadrant_batches

from impq_onnx.engine import fine_tune
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.quantizers import activation_grid, learned_step_factor
from impq_onnx.quant.simulate import calibrate_clips, learned_clips, learned_step_name, simulate
from impq_onnx.runtime import inference_session

SCALE = 300.0


@pytest.fixture(scope="module")
def tiny():
    canonical, sites = canonical_and_sites()
    plan = PrecisionPlan.uniform(sites, 4, 3)
    plan = calibrate_clips(canonical, plan, sites, quadrant_batches(2, 32)(), only_missing=False, threads=1)
    return canonical, sites, plan


def _logits(proto, x):
    return inference_session(proto.SerializeToString()).run(None, {"x": x})[0]


def _steps(proto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.endswith("/learned_step")}


def test_the_learned_quantizer_computes_the_fixed_one_and_its_step_reads_back_exactly(tiny):
    canonical, sites, plan = tiny
    assert plan.activations and all(c.value for c in plan.clips.values())
    x, _ = next(iter(quadrant_batches(1, 64, seed=5)()))
    fixed, learned = simulate(canonical, plan, sites), simulate(canonical, plan, sites, learn_clips=SCALE)
    steps = _steps(learned)
    assert set(steps) == {learned_step_name(t) for t in plan.activations}
    np.testing.assert_array_equal(_logits(learned, x), _logits(fixed, x))
    # the clips read back from the initial steps are the plan's (float32), and a plan holding them rebuilds the
    # same steps bit for bit: what carries a learned clip from one fine-tune (or refit part) to the next
    back = learned_clips(plan, sites, steps, SCALE)
    assert back == {t: float(np.float32(c.value)) for t, c in plan.clips.items()}
    again = _steps(simulate(canonical, plan.with_clips(back), sites, learn_clips=SCALE))
    assert again.keys() == steps.keys() and all(np.array_equal(again[n], steps[n]) for n in steps)


def test_the_step_factor_is_a_power_of_two_near_lsq_times_the_scale():
    for elements, bits, signed in [(1, 2, False), (4096, 4, False), (4096, 4, True), (10**6, 8, False)]:
        k = learned_step_factor(elements, bits, signed, SCALE)
        top = activation_grid(bits, 1.0, signed)[2]
        ideal = np.sqrt(SCALE / np.sqrt(elements * top))
        assert np.log2(k) == np.round(np.log2(k)) and ideal / np.sqrt(2) <= k <= ideal * np.sqrt(2)


def test_a_fine_tune_learns_the_clips_and_keeps_them_apart_from_the_weights(tiny):
    canonical, sites, plan = tiny
    args = dict(steps=30, lr=0.05, progress=False, replicas=1, threads=1)
    fixed = fine_tune(canonical, plan, sites, quadrant_batches(12, 32), **args)
    learned = fine_tune(canonical, plan, sites, quadrant_batches(12, 32), learn_clips=SCALE, **args)
    assert fixed.clips == {} and set(learned.clips) == set(plan.activations)
    assert set(learned.values) == set(fixed.values)  # the steps are not model parameters
    moved = [learned.clips[t] / plan.clips[t].value for t in plan.activations]
    assert all(np.isfinite(moved)) and any(abs(m - 1) > 1e-3 for m in moved), moved
    assert learned.losses != fixed.losses


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_fine_tune_in_parts_learns_what_one_call_does(tiny, replicas):
    """The second part starts from the first part's clips (through the plan) and momentum: the one call's
    losses, weights and clips, bit for bit (what a checkpointed refit with learned clips relies on)."""
    canonical, sites, plan = tiny
    args = dict(steps=24, lr=0.05, warmup_steps=3, progress=False, replicas=replicas, batchnorm="train",
                learn_clips=SCALE)
    whole = fine_tune(canonical, plan, sites, quadrant_batches(12, 32), **args)
    velocity: dict = {}
    first = fine_tune(canonical, plan, sites, quadrant_batches(12, 32), stop_step=12, velocity=velocity, **args)
    assert set(velocity) >= {learned_step_name(t) for t in plan.activations}
    second = fine_tune(first.apply_to(canonical), plan.with_clips(first.clips), sites, quadrant_batches(12, 32),
                       start_step=12, velocity=velocity, **args)
    assert first.losses + second.losses == whole.losses
    assert second.clips == whole.clips and first.clips != whole.clips
    for name, value in whole.values.items():
        np.testing.assert_array_equal(second.values[name], value, err_msg=name)

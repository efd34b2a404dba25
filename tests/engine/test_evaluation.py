"""evaluate(): top-1/top-5 and agreement counted by hand, simulated plans, unlabelled data."""

from __future__ import annotations

import numpy as np
import pytest

from impq_onnx.engine import evaluate, predict_logits
from impq_onnx.engine.evaluation import predicted_classes
from impq_onnx.errors import DataError
from impq_onnx.quant.plan import PrecisionPlan
from quant_models import canonical_and_sites, quadrant_batches


@pytest.fixture(scope="module")
def tiny():
    return canonical_and_sites()


def test_counts_match_a_hand_computation(tiny):
    canonical, sites = tiny
    batches = list(quadrant_batches(3, 20, seed=4)())
    result = evaluate(canonical, batches, float_model=canonical)
    logits = np.concatenate([predict_logits(canonical, x) for x, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    assert result.n == 60
    assert result.top1 == pytest.approx(np.mean(np.argmax(logits, 1) == labels))
    top3 = np.argsort(-logits, 1)[:, :3]
    assert evaluate(canonical, batches).top5 == 1.0  # 4 classes: top-5 is everything
    assert result.agreement == 1.0
    assert result.images_per_second > 0
    assert np.mean(np.any(top3 == labels[:, None], 1)) >= result.top1


def test_simulated_plan_and_agreement(tiny):
    canonical, sites = tiny
    batches = list(quadrant_batches(3, 20, seed=4)())
    plan = PrecisionPlan.uniform(sites, 1, None)
    result = evaluate(canonical, batches, plan=plan, sites=sites, float_model=canonical)
    float_pred = np.concatenate([np.argmax(predict_logits(canonical, x), 1) for x, _ in batches])
    sim_pred = np.concatenate([np.argmax(predict_logits(canonical, x, plan=plan, sites=sites), 1) for x, _ in batches])
    assert result.agreement == pytest.approx(np.mean(float_pred == sim_pred))
    assert result.agreement < 1.0  # 1-bit weights change some predictions


def test_unlabelled_batches_and_limits(tiny, capsys):
    canonical, _ = tiny
    images = [x for x, _ in quadrant_batches(4, 8)()]
    result = evaluate(canonical, images, float_model=canonical, max_batches=2, threads=1, progress=True)
    assert result.top1 is None and result.top5 is None and result.n == 16 and result.agreement == 1.0
    assert "evaluate 16 images" in capsys.readouterr().err
    with pytest.raises(DataError):
        evaluate(canonical, [])


@pytest.mark.parametrize("replicas", [2, 3])
def test_replicas_split_batches_and_give_the_single_session_result(tiny, replicas):
    """Batches of 37 and 50 images (uneven parts, a short last part) over several single-threaded sessions."""
    canonical, sites = tiny
    batches = [(x[:37], y[:37]) for x, y in quadrant_batches(1, 50, seed=5)()] + list(quadrant_batches(1, 50, seed=6)())
    plan = PrecisionPlan.uniform(sites, 2, 3, default_clip=2.0)
    one = evaluate(canonical, batches, plan=plan, sites=sites, float_model=canonical, threads=1, replicas=1)
    many = evaluate(canonical, batches, plan=plan, sites=sites, float_model=canonical, threads=replicas,
                    replicas=replicas)
    assert (many.n, many.top1, many.top5, many.agreement) == (one.n, one.top1, one.top5, one.agreement) and one.n == 87
    assert 0.0 < one.agreement < 1.0  # 2-bit weights change some predictions: the comparison can fail


def test_float_classes_stand_in_for_the_float_model(tiny):
    canonical, sites = tiny
    batches = list(quadrant_batches(3, 20, seed=4)())
    plan = PrecisionPlan.uniform(sites, 1, None)
    classes = predicted_classes(canonical, batches)
    assert classes.shape == (60,) and np.array_equal(
        classes, np.concatenate([np.argmax(predict_logits(canonical, x), 1) for x, _ in batches]))
    run = evaluate(canonical, batches, plan=plan, sites=sites, float_model=canonical)
    cached = evaluate(canonical, batches, plan=plan, sites=sites, float_classes=classes)
    assert cached.agreement == run.agreement < 1.0
    kept = evaluate(canonical, batches, keep_classes=True)  # the float model's own evaluation gives them too
    assert np.array_equal(kept.classes, classes) and "classes" not in kept.to_dict()
    assert run.classes is None
    with pytest.raises(DataError, match="60 float-model classes given for 40 images"):
        evaluate(canonical, batches[:2], plan=plan, sites=sites, float_classes=classes)

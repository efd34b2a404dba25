"""Real onnxruntime-training runs on a tiny CNN and a learnable task (which quadrant is bright)."""

from __future__ import annotations

import numpy as np
import pytest

from impq_onnx.engine import evaluate, fine_tune, warmup_cosine, warmup_exponential
from impq_onnx.engine.replicas import distillation_target
from impq_onnx.errors import ConfigError, DataError
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.runtime import inference_session
from impq_onnx.quant.simulate import as_proto, calibrate_clips
from quant_models import canonical_and_sites, quadrant_batches

STEPS = 150


@pytest.fixture(scope="module")
def tiny():
    return canonical_and_sites()


def _decreased(losses: list[float], factor: float = 0.85) -> bool:
    return np.mean(losses[-10:]) < factor * np.mean(losses[:10])


def _train(canonical, plan, sites, **kw):
    args = dict(steps=STEPS, lr=0.05, optimizer="sgd", progress=False)
    args.update(kw)
    return fine_tune(canonical, plan, sites, quadrant_batches(12, 32), **args)


def test_float_training_learns_and_updates_batchnorm(tiny):
    canonical, sites = tiny
    trained = _train(canonical, None, sites)
    assert _decreased(trained.losses), trained.losses
    before = {t.name: t for t in as_proto(canonical).graph.initializer}
    from onnx import numpy_helper

    for stat in ("bn1.mean", "bn1.var", "bn2.mean", "bn2.var"):
        assert not np.allclose(trained.values[stat], numpy_helper.to_array(before[stat])), stat
    tuned = trained.apply_to(canonical)
    test = list(quadrant_batches(4, 64, seed=99)())
    assert evaluate(tuned, test).top1 > evaluate(canonical, test).top1 + 0.2
    assert tuned is not canonical and type(tuned) is type(canonical)


def test_batchnorm_running_statistics_follow_onnx_semantics(tiny):
    canonical, sites = tiny
    # One session: the full batch's statistics (replicas' per-part ones are tested below).
    trained = _train(canonical, None, sites, steps=1, lr=0.0, weight_decay=0.0, replicas=1)
    import onnx

    proto = as_proto(canonical)
    proto.graph.output.append(onnx.helper.make_tensor_value_info("c1", onnx.TensorProto.FLOAT, None))
    x, _ = next(iter(quadrant_batches(1, 32)()))
    c1 = inference_session(proto.SerializeToString()).run(["c1"], {"x": x})[0]
    # running = 0.9 * old + 0.1 * batch statistic; onnxruntime uses the biased (population) variance
    np.testing.assert_allclose(trained.values["bn1.mean"], 0.1 * c1.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(trained.values["bn1.var"], 0.9 + 0.1 * c1.var(axis=(0, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize("replicas", [1, 2])
def test_frozen_batchnorm_keeps_running_statistics_and_trains_scale_and_shift(tiny, replicas):
    """batchnorm="frozen": the gradient graph normalises with the running statistics (inference
    arithmetic): with lr 0 the tuned model is the input model; with training the statistics stay
    bit-identical while gamma/beta and the weights move and the loss falls."""
    canonical, sites = tiny
    from onnx import numpy_helper

    before = {t.name: numpy_helper.to_array(t) for t in as_proto(canonical).graph.initializer}
    idle = _train(canonical, None, sites, steps=2, lr=0.0, weight_decay=0.0, batchnorm="frozen", replicas=replicas)
    assert set(idle.values) >= {"bn1.scale", "bn1.bias"} and not {"bn1.mean", "bn1.var"} & set(idle.values)
    for name, value in idle.values.items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    # the training graph's forward equals inference batch-norm: its first loss is the float model's loss
    x, y = next(iter(quadrant_batches(12, 32)()))
    logits = inference_session(as_proto(canonical).SerializeToString()).run(None, {"x": x})[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    expected = float(np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(y)), y]))
    assert idle.losses[0] == pytest.approx(expected, rel=1e-4)
    trained = _train(canonical, None, sites, batchnorm="frozen", replicas=replicas)
    assert _decreased(trained.losses), trained.losses
    assert not np.allclose(trained.values["bn1.scale"], before["bn1.scale"])
    tuned = as_proto(trained.apply_to(canonical))
    after = {t.name: numpy_helper.to_array(t) for t in tuned.graph.initializer}
    for stat in ("bn1.mean", "bn1.var", "bn2.mean", "bn2.var"):
        np.testing.assert_array_equal(after[stat], before[stat], err_msg=stat)


def test_unknown_batchnorm_mode_is_refused(tiny):
    canonical, sites = tiny
    with pytest.raises(ConfigError, match="batchnorm 'fixed' is unknown"):
        _train(canonical, None, sites, steps=1, batchnorm="fixed")


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adamw", 0.01)])
def test_4_bit_training_learns(tiny, optimizer, lr):
    canonical, sites = tiny
    plan = calibrate_clips(canonical, PrecisionPlan.uniform(sites, 4, 4), sites, quadrant_batches(5, 32)())
    trained = _train(canonical, plan, sites, optimizer=optimizer, lr=lr)
    assert _decreased(trained.losses), trained.losses
    test = list(quadrant_batches(4, 64, seed=99)())
    tuned = trained.apply_to(canonical)
    assert evaluate(tuned, test, plan=plan, sites=sites).top1 > 0.6


def test_mixed_1_to_8_bit_plan_trains(tiny):
    canonical, sites = tiny
    plan = PrecisionPlan.uniform(sites, 4, None)
    rng = np.random.default_rng(0)
    for layer in sites.layers:
        plan.weights[layer.node] = [int(b) for b in rng.integers(1, 9, layer.kernels)]
    trained = _train(canonical, plan, sites, optimizer="adamw", lr=0.01)
    assert all(np.isfinite(trained.losses))
    assert _decreased(trained.losses), trained.losses


def test_distillation_without_labels(tiny):
    canonical, sites = tiny
    teacher = _train(canonical, None, sites).apply_to(canonical)
    plan = PrecisionPlan.uniform(sites, 2, None)
    unlabelled = quadrant_batches(12, 32)

    def images():
        for x, _ in unlabelled():
            yield (x, None)

    trained = fine_tune(teacher, plan, sites, images, steps=STEPS, lr=0.01, optimizer="adamw", progress=False)
    # soft cross-entropy = KL(teacher || student) + teacher entropy: the KL part must shrink
    session = inference_session(as_proto(teacher).SerializeToString())
    entropy = []
    for x, _ in unlabelled():
        logits = session.run(None, {"x": x})[0].astype(np.float64)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        entropy.append(float(np.mean(-np.sum(p * np.log(p), 1))))
    kl = [loss - entropy[step % len(entropy)] for step, loss in enumerate(trained.losses)]
    assert min(kl) > -1e-4
    assert np.mean(kl[-10:]) < 0.6 * np.mean(kl[:10]), kl
    test = list(quadrant_batches(4, 64, seed=99)())
    result = evaluate(trained.apply_to(teacher), test, plan=plan, sites=sites, float_model=teacher)
    assert result.agreement > 0.7


def test_fixed_seed_is_deterministic(tiny):
    canonical, sites = tiny
    plan = PrecisionPlan.uniform(sites, 3, None)
    a = _train(canonical, plan, sites, steps=15)
    b = _train(canonical, plan, sites, steps=15)
    assert a.losses == b.losses
    for name in a.values:
        np.testing.assert_array_equal(a.values[name], b.values[name])


def test_errors_are_one_line(tiny):
    canonical, sites = tiny
    with pytest.raises(ConfigError, match="optimizer 'lbfgs' is unknown"):
        _train(canonical, None, sites, optimizer="lbfgs")
    with pytest.raises(DataError, match="no batches"):
        fine_tune(canonical, None, sites, [], steps=3, lr=0.1, progress=False)
    with pytest.raises(DataError, match="no labels"):
        fine_tune(canonical, None, sites, [(np.zeros((2, 3, 8, 8), np.float32), None)], steps=1, lr=0.1,
                  distill=False, progress=False)


def test_progress_goes_to_the_callback(tiny):
    canonical, sites = tiny
    lines = []
    _train(canonical, None, sites, steps=3, progress=lines.append)
    assert lines and str(lines[-1]).startswith("fine-tune step 3/3 loss")
    assert [e.kind for e in lines] == ["phase_start", "step", "step", "step", "phase_end"]
    assert [e.step for e in lines if e.kind == "step"] == [1, 2, 3] and lines[1].total == 3
    assert set(lines[-1].data) == {"loss", "seconds"} and lines[-1].data["loss"] > 0


def test_warmup_cosine_shape():
    rates = [warmup_cosine(s, 100, 1.0, 10) for s in range(100)]
    assert rates[0] == pytest.approx(1 / 11) and max(rates) == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(rates[:10], rates[1:11]))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[-1] < 0.01
    assert warmup_cosine(0, 1, 0.5, 10) == 0.5


def test_warmup_exponential_is_a_constant_factor_per_step_and_segments_join():
    rates = [warmup_exponential(s, 50, 0.1, 0, 1e-3) for s in range(50)]
    ratios = [b / a for a, b in zip(rates, rates[1:])]
    assert rates[0] == 0.1 and max(ratios) == pytest.approx(min(ratios)) and ratios[0] < 1
    # The step after the last would train at final_lr, so a next segment starting there continues the curve.
    assert rates[-1] * ratios[0] == pytest.approx(1e-3)
    whole = [warmup_exponential(s, 100, 0.1, 0, 1e-5) for s in range(100)]
    halves = [warmup_exponential(s, 50, 0.1, 0, 1e-3) for s in range(50)] + \
             [warmup_exponential(s, 50, 1e-3, 0, 1e-5) for s in range(50)]
    assert halves == pytest.approx(whole)
    warm = [warmup_exponential(s, 20, 1.0, 4, 0.01) for s in range(20)]
    assert warm[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and warm[4] == 1.0
    with pytest.raises(ValueError, match="positive"):
        warmup_exponential(0, 10, 0.1, 0, 0.0)


def test_fine_tune_rejects_an_unknown_or_impossible_schedule(tiny):
    canonical, sites = tiny
    with pytest.raises(ConfigError, match="schedule 'linear' is unknown"):
        _train(canonical, None, sites, steps=2, lr_schedule="linear")
    with pytest.raises(ConfigError, match="exponential"):
        _train(canonical, None, sites, steps=2, lr_schedule="exponential", final_lr=0.0)


@pytest.mark.parametrize("opset", [13, 18])
def test_training_works_across_opsets(opset):
    from quant_models import tiny_cnn

    canonical, sites = canonical_and_sites(tiny_cnn(opset=opset))
    plan = PrecisionPlan.uniform(sites, 4, 4, default_clip=3.0)
    trained = _train(canonical, plan, sites, steps=100)
    assert _decreased(trained.losses), trained.losses
    assert not np.allclose(trained.values["bn1.mean"], 0.0)


# --- replicas: data-parallel training inside one process -------------------------------------------------------


def _cnn_without_batchnorm(seed: int = 0):
    """conv3x3(3->6)+Relu -> conv3x3(6->8, stride 2, bias)+Relu -> GlobalAveragePool -> Flatten -> Gemm(8->4)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=None):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        value = rng.standard_normal(shape) * (scale or np.sqrt(2.0 / fan_in))
        return numpy_helper.from_array(value.astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "conv1.w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.w", "conv2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn_without_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        initializer=[init("conv1.w", 6, 3, 3, 3), init("conv2.w", 8, 6, 3, 3), init("conv2.b", 8, scale=0.1),
                     init("fc.w", 4, 8, scale=0.5), init("fc.b", 4, scale=0.1)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _initial_value(canonical, name):
    from onnx import numpy_helper

    return numpy_helper.to_array(next(t for t in as_proto(canonical).graph.initializer if t.name == name))


@pytest.mark.parametrize("replicas, batch, distill", [(2, 32, False), (3, 32, False), (4, 3, False), (2, 30, True)])
def test_replicas_give_the_full_batch_gradient_without_batchnorm(replicas, batch, distill):
    # 32 in 3 parts is 11/11/10 and 3 in 4 parts leaves one empty: each part's gradient is weighted by its share.
    canonical, sites = canonical_and_sites(_cnn_without_batchnorm())
    batches = quadrant_batches(3, batch)
    if distill:
        teacher = canonical_and_sites(_cnn_without_batchnorm(seed=1))[0]
        labelled = batches

        def batches():
            for x, _ in labelled():
                yield (x, None)

    runs = [fine_tune(canonical, None, sites, batches, steps=5, lr=0.1, momentum=0.9, weight_decay=5e-4,
                      progress=False, replicas=r, teacher=teacher if distill else None) for r in (1, replicas)]
    one, many = runs
    assert many.steps == 5 and many.images == 5 * batch and len(many.step_seconds) == 5
    assert many.losses == pytest.approx(one.losses, rel=1e-5)
    assert set(many.values) == set(one.values)
    for name in one.values:
        assert not np.allclose(one.values[name], _initial_value(canonical, name)), name  # it did train
        np.testing.assert_allclose(many.values[name], one.values[name], atol=1e-5, rtol=0, err_msg=name)


def test_replicas_are_deterministic_and_learn(tiny):
    canonical, sites = tiny
    plan = calibrate_clips(canonical, PrecisionPlan.uniform(sites, 4, 4), sites, quadrant_batches(5, 32)())
    a = _train(canonical, plan, sites, replicas=2)
    b = _train(canonical, plan, sites, replicas=2)
    assert a.losses == b.losses
    for name in a.values:
        assert a.values[name].tobytes() == b.values[name].tobytes(), name
    assert _decreased(a.losses), a.losses
    test = list(quadrant_batches(4, 64, seed=99)())
    assert evaluate(a.apply_to(canonical), test, plan=plan, sites=sites).top1 > 0.6


def test_replicas_batchnorm_uses_each_parts_statistics(tiny):
    canonical, sites = tiny
    trained = _train(canonical, None, sites, steps=1, lr=0.0, weight_decay=0.0, replicas=2)
    import onnx

    proto = as_proto(canonical)
    proto.graph.output.append(onnx.helper.make_tensor_value_info("c1", onnx.TensorProto.FLOAT, None))
    x, _ = next(iter(quadrant_batches(1, 32)()))
    c1 = inference_session(proto.SerializeToString()).run(["c1"], {"x": x})[0]
    halves = (c1[:16], c1[16:])
    # the running mean moves as with the whole batch; the variance toward the mean of the halves' variances
    np.testing.assert_allclose(trained.values["bn1.mean"], 0.1 * c1.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    part_var = np.mean([h.var(axis=(0, 2, 3)) for h in halves], axis=0)
    np.testing.assert_allclose(trained.values["bn1.var"], 0.9 + 0.1 * part_var, rtol=1e-5)
    assert not np.allclose(part_var, c1.var(axis=(0, 2, 3)), rtol=1e-3)


def test_replicas_need_sgd_and_a_positive_count(tiny):
    canonical, sites = tiny
    with pytest.raises(ConfigError, match="replicas > 1 needs optimizer 'sgd'"):
        _train(canonical, None, sites, steps=2, optimizer="adamw", replicas=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="replicas must be"):
            _train(canonical, None, sites, steps=2, replicas=bad)


def test_default_replicas_are_one_per_thread_with_parts_of_at_least_16_images():
    from impq_onnx.runtime import MIN_REPLICA_BATCH, available_cores, default_replicas, resolve_threads

    assert MIN_REPLICA_BATCH == 16
    assert default_replicas(2, 32) == 2 and default_replicas(2, 128) == 2
    assert default_replicas(2, 31) == 1 and default_replicas(1, 128) == 1  # parts of 15 images; one thread
    assert default_replicas(8, 64) == 4 and default_replicas(8, 512) == 8
    assert default_replicas(8, 512, "adamw") == 1  # replicas need SGD
    import os

    assert resolve_threads(None) == available_cores() == len(os.sched_getaffinity(0))
    assert resolve_threads(3) == 3


def test_fine_tune_defaults_to_the_resolved_replica_count(tiny):
    from impq_onnx.runtime import default_replicas

    canonical, sites = tiny
    default = _train(canonical, None, sites, steps=3, threads=2)
    explicit = _train(canonical, None, sites, steps=3, threads=2, replicas=default_replicas(2, 32))
    single = _train(canonical, None, sites, steps=3, threads=2, replicas=1)
    assert default.losses == explicit.losses
    for name in default.values:
        assert default.values[name].tobytes() == explicit.values[name].tobytes(), name
    # 2 replicas on 2 threads at batch 32: per-part batch-norm statistics, so not the single session's numbers
    assert any(default.values[n].tobytes() != single.values[n].tobytes() for n in default.values)


def test_laps_split_a_fine_tune_into_its_parts(tiny):
    import time

    from impq_onnx.runtime import lap, recording_laps

    canonical, sites = tiny
    start = time.perf_counter()
    with recording_laps() as laps:
        _train(canonical, None, sites, steps=2)
        lap("after")
    wall = time.perf_counter() - start
    assert list(laps.seconds) == ["data", "graph build", "training artifacts", "session creation", "fine-tune steps",
                                  "fine-tune other", "after"]
    assert all(v >= 0 for v in laps.seconds.values()) and sum(laps.seconds.values()) <= wall
    lap("outside")  # not recorded: no recording is active any more
    assert "outside" not in laps.seconds


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_fine_tune_in_parts_computes_what_one_call_does(tiny, replicas):
    """Two parts of a 24-step schedule (steps 0-12, then 12-24 on the first part's weights and velocity,
    the batches continuing at the second epoch of 12) give the one call's losses and weights bit for bit:
    what a checkpointed refit relies on (batch-norm in train mode, so its running statistics carry too)."""
    canonical, sites = tiny
    plan = PrecisionPlan.uniform(sites, 3, None)
    args = dict(steps=24, lr=0.05, warmup_steps=3, progress=False, replicas=replicas, batchnorm="train")
    whole = fine_tune(canonical, plan, sites, quadrant_batches(12, 32), **args)
    velocity: dict = {}
    first = fine_tune(canonical, plan, sites, quadrant_batches(12, 32), stop_step=12, velocity=velocity, **args)
    assert velocity and first.steps == 12
    second = fine_tune(first.apply_to(canonical), plan, sites, quadrant_batches(12, 32), start_step=12,
                       velocity=velocity, **args)
    assert first.losses + second.losses == whole.losses
    assert set(second.values) == set(whole.values)
    for name, value in whole.values.items():
        np.testing.assert_array_equal(second.values[name], value, err_msg=name)
    # without the velocity the second part is a different (restarted-momentum) fine-tune: the check can fail
    restarted = fine_tune(first.apply_to(canonical), plan, sites, quadrant_batches(12, 32), start_step=12, **args)
    assert restarted.losses != second.losses


def test_a_fine_tune_part_is_checked(tiny):
    canonical, sites = tiny
    with pytest.raises(ConfigError, match="start_step < stop_step <= steps"):
        _train(canonical, None, sites, steps=10, start_step=10)
    with pytest.raises(ConfigError, match="start_step < stop_step <= steps"):
        _train(canonical, None, sites, steps=10, stop_step=11)
    with pytest.raises(ConfigError, match="needs optimizer 'sgd'"):
        _train(canonical, None, sites, steps=10, stop_step=5, optimizer="adamw")


def test_distillation_target_softmax_is_the_mix_of_teacher_and_label():
    rng = np.random.default_rng(0)
    teacher, labels, temperature = rng.normal(size=(5, 4)).astype(np.float32) * 3, np.array([0, 3, 1, 1, 2]), 2.0
    target = distillation_target(teacher, labels, 0.3, temperature)
    assert target.dtype == np.float32 and target.shape == teacher.shape

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    expected = 0.7 * softmax(teacher.astype(np.float64) / temperature) + 0.3 * np.eye(4)[labels]
    np.testing.assert_allclose(softmax(target.astype(np.float64) / temperature), expected, rtol=1e-5)
    assert distillation_target(teacher, labels, 0.0, temperature) is teacher  # no mix: the teacher's logits
    assert distillation_target(teacher, None, 0.3, temperature) is teacher  # no labels: nothing to mix


@pytest.mark.parametrize("replicas", [1, 2])
def test_label_mix_is_the_weighted_sum_of_both_losses_and_1_is_label_training(replicas):
    canonical, sites = canonical_and_sites(_cnn_without_batchnorm())
    teacher = canonical_and_sites(_cnn_without_batchnorm(seed=1))[0]

    def run(steps, **kw):
        return fine_tune(canonical, None, sites, quadrant_batches(3, 32), steps=steps, lr=0.1, progress=False,
                         replicas=replicas, **kw)

    first = {mix: run(1, distill=True, teacher=teacher, label_mix=mix).losses[0] for mix in (0.0, 0.25, 1.0)}
    labels_only = run(1, distill=False).losses[0]
    assert first[1.0] == pytest.approx(labels_only, rel=1e-5)
    assert first[0.25] == pytest.approx(0.75 * first[0.0] + 0.25 * labels_only, rel=1e-5)
    assert abs(first[0.0] - labels_only) > 0.01  # the teacher and the labels disagree: the mix is visible
    mixed, labelled = run(5, distill=True, teacher=teacher, label_mix=1.0), run(5, distill=False)
    assert mixed.losses == pytest.approx(labelled.losses, rel=1e-4)
    for name in labelled.values:
        np.testing.assert_allclose(mixed.values[name], labelled.values[name], atol=1e-5, rtol=0, err_msg=name)


def test_label_mix_is_checked(tiny):
    canonical, sites = tiny
    with pytest.raises(ConfigError, match=r"label_mix must be in \[0, 1\], not 1.5"):
        _train(canonical, None, sites, distill=True, label_mix=1.5)
    with pytest.raises(ConfigError, match="needs distill=True and labelled data"):
        _train(canonical, None, sites, distill=False, label_mix=0.5)
    labelled = quadrant_batches(2, 8)

    def unlabelled():
        for x, _ in labelled():
            yield (x, None)

    with pytest.raises(ConfigError, match="needs distill=True and labelled data"):
        fine_tune(canonical, None, sites, unlabelled, steps=2, lr=0.01, label_mix=0.5, progress=False)

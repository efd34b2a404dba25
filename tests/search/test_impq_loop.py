"""The loop's bookkeeping: phases, stop rules, the kept iteration.

STAND-INS: these tests replace fine-tuning, evaluation and the sensitivity measurement with fast fakes
(a scripted accuracy, a fixed ranking) so that only the loop's decisions are under test. The real
components run end to end in tests/test_compress.py and tests/search/test_resume.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from impq_onnx.architectures import fashion_net
from impq_onnx.compression import CompressConfig
from impq_onnx.data import PRESETS, dataset_from_arrays
from impq_onnx.engine import EvalResult, TrainedWeights
from impq_onnx.frontend.canonical import from_proto
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.search import impq, iteration
from impq_onnx.search.checkpoint import WorkDir
from impq_onnx.search.state import SearchContext, SearchState
from impq_onnx.sensitivity import SensitivityTable
from impq_onnx.frontend.site_analysis import find_sites


@pytest.fixture(scope="module")
def net():
    base = from_proto(fashion_net())
    return base, find_sites(base, (1, 1, 28, 28))


@pytest.fixture
def stand_ins(monkeypatch):
    """Fake fine-tune (no change), fake evaluation (top-1 = accuracy(plan)), fake sensitivity
    (a fixed ranking: groups and sites in name order, the first least sensitive)."""
    calls = {"accuracy": lambda plan: 0.9}

    def fake_fine_tune(model, plan, sites, batches, *, steps, **kwargs):
        next(iter(batches()))  # the data factory works
        return TrainedWeights({}, [0.1] * steps, steps, steps, 0.0)

    def fake_evaluate(model, batches, *, plan=None, sites=None, float_model=None, threads=2, **kwargs):
        return EvalResult(calls["accuracy"](plan), 1.0, 1.0, 10, 1.0)

    def fake_noise_gain(model, sites, batches, *, plan=None, granularity="kernel", **kwargs):
        groups = [g.name for g in sites.weight_groups(granularity)]
        return SensitivityTable({n: float(i) for i, n in enumerate(groups)},
                                {s.tensor: float(i) for i, s in enumerate(sites.activations)},
                                granularity, "paper", "stand-in", 1, 1, 0.0)

    monkeypatch.setattr(iteration, "fine_tune", fake_fine_tune)
    monkeypatch.setattr(iteration, "evaluate", fake_evaluate)
    monkeypatch.setattr(impq, "noise_gain", fake_noise_gain)
    return calls


def _run(net, tmp_path, **options):
    base, sites = net
    cfg = CompressConfig(model="m.onnx", data="d", **{"granularity": "network", "phases": "weights",
                                                      "target_bits": None, "target_act_bits": None, **options})
    rng = np.random.default_rng(0)
    train = dataset_from_arrays(rng.integers(0, 255, (20, 28, 28), np.uint8), rng.integers(0, 10, 20),
                                PRESETS["fashion-mnist"])
    work = WorkDir(tmp_path / "work")
    work.start({})
    context = SearchContext(cfg, base, sites, train, train, work, {"top1": 0.9})
    state = impq.run_search(context, SearchState(PrecisionPlan.uniform(sites, None, None, granularity=cfg.granularity)))
    return state, work


def _bits(record):
    return record.weight_bits_effective


def test_target_bits_ends_the_phase_at_the_first_iteration_that_reaches_it(net, tmp_path, stand_ins):
    state, work = _run(net, tmp_path, target_bits=6.0)
    assert [_bits(r) for r in state.records] == [8.0, 7.0, 6.0]
    assert state.stop == "target_bits" and state.final == 2
    assert state.records[-1].phase_end == "target_bits"
    assert work.load_state()["final"] == 2


def test_the_lowering_that_passes_the_target_lands_on_it(net, tmp_path, stand_ins):
    # kernel groups, 50 % per iteration from 4 bits: 4 -> 3.60 -> 3.21 would pass 3.4 by 0.2 bits
    options = dict(granularity="kernel", start_bits=4, schedule="50%", target_bits=3.4)
    on, _ = _run(net, tmp_path, **options)
    off, _ = _run(net, tmp_path / "off", land_on_target=False, **options)
    landed, whole = [_bits(r) for r in on.records], [_bits(r) for r in off.records]
    assert len(landed) == len(whole) == 3 and landed[:2] == whole[:2] and landed[1] > 3.4
    assert whole[-1] < 3.3  # without landing: a whole schedule step below the target
    assert 3.35 < landed[-1] <= 3.4 and on.stop == off.stop == "target_bits"
    assert 0 < on.records[-1].lowered < off.records[-1].lowered


def test_max_accuracy_drop_keeps_the_last_iteration_within_it(net, tmp_path, stand_ins):
    stand_ins["accuracy"] = lambda plan: 0.9 if plan.weights["conv1"][0] >= 6 else 0.5
    state, work = _run(net, tmp_path, max_accuracy_drop=10.0, target_bits=2.0)
    assert [_bits(r) for r in state.records] == [8.0, 7.0, 6.0, 5.0]
    assert [r.within_accuracy_drop for r in state.records] == [True, True, True, False]
    assert state.stop == "max_accuracy_drop" and state.final == 2
    plan, _ = work.load_iteration(2)  # kept: its weights were not pruned
    assert plan.weights["conv1"][0] == 6
    assert not (work.iteration_dir(1) / "weights.npz").exists()


def test_stop_rules_combine_the_first_to_fire_wins(net, tmp_path, stand_ins):
    _, sites = net
    plan7 = PrecisionPlan.uniform(sites, 7, None)
    state, _ = _run(net, tmp_path, target_gbitops=plan7.bitops(sites) + 1e-12, target_bits=2.0)
    assert state.stop == "target_gbitops" and state.final == 1


def test_time_budget_decision_is_recorded_in_the_commit(net, tmp_path, stand_ins):
    state, work = _run(net, tmp_path, time_budget=0.0, target_bits=2.0)
    assert state.stop == "time_budget" and len(state.records) == 1
    assert work.load_state()["stop"] == "time_budget"


def test_max_iterations_and_phase_order_activations_first(net, tmp_path, stand_ins):
    state, _ = _run(net, tmp_path, phases="activations-weights", max_iterations=2)
    phases = [(r.phase, r.kind) for r in state.records]
    assert phases == [("activations", "start"), ("activations", "lower"), ("activations", "lower"),
                      ("weights", "start"), ("weights", "lower"), ("weights", "lower")]
    first = state.records[0]
    assert first.weight_bits_effective == 32.0 and first.activation_bits_effective == 8.0
    assert state.stop == "max_iterations"
    # the stand-in ranking puts the first activation site first: N = round(50% of 5) = 3 per step
    assert [r.lowered for r in state.records[:3]] == [0, 3, 3]


def test_a_phase_ends_when_every_group_is_at_one_bit(net, tmp_path, stand_ins):
    state, _ = _run(net, tmp_path, start_bits=2, max_iterations=10)
    assert [_bits(r) for r in state.records] == [2.0, 1.0]
    assert state.stop == "all_groups_at_1_bit"


def test_pick_least_sensitive_breaks_ties_by_name_and_skips_nan():
    scores = {"b": 1.0, "a": 1.0, "c": float("nan"), "d": 0.5}
    assert impq.pick_least_sensitive(scores, ["a", "b", "c", "d"], 3) == ["d", "a", "b"]


def test_derived_seeds_depend_only_on_their_arguments():
    assert iteration.derive_seed(0, 3, "train", 1) == iteration.derive_seed(0, 3, "train", 1)
    assert len({iteration.derive_seed(0, i, p) for i in range(4) for p in ("train", "sensitivity")}) == 8


def test_steps_from_epochs_and_start_steps():
    train = list(range(100))  # only its length matters
    cfg = CompressConfig(steps=7, batch_size=16, start_steps=11)
    assert iteration.fine_tune_steps(cfg, train, start=False) == 7
    assert iteration.fine_tune_steps(cfg, train, start=True) == 11
    cfg = CompressConfig(epochs=1.5, batch_size=16)
    assert iteration.fine_tune_steps(cfg, train, start=True) == 9  # 6 full batches per epoch
    # The lowering that lands on a phase's target: end_steps_factor times (not given: END_STEPS_FACTOR times)
    assert iteration.fine_tune_steps(cfg, train, end=True) == 9 * iteration.END_STEPS_FACTOR
    cfg = CompressConfig(steps=7, batch_size=16, start_steps=11, end_steps_factor=2.5)
    assert iteration.fine_tune_steps(cfg, train, end=True) == 18  # ceil(17.5)
    assert iteration.fine_tune_steps(cfg, train, start=True) == 11


def _one_step_left():
    """A weights-phase config with target 4 and a 250 s budget, a record of 100 s, and 20 training images:
    with 100 s elapsed the budget holds one lowering step."""
    import dataclasses
    import json
    from pathlib import Path

    from impq_onnx.search.state import IterationRecord

    row = json.loads((Path(__file__).parent / "data" / "v1" / "faq.iterations.json").read_text())[0]
    records = [dataclasses.replace(IterationRecord.from_dict(row), seconds=100.0)]
    cfg = CompressConfig(model="m.onnx", data="d", granularity="kernel", phases="weights", target_bits=4.0,
                         target_act_bits=None, time_budget=250.0)
    rng = np.random.default_rng(0)
    train = dataset_from_arrays(rng.integers(0, 255, (20, 28, 28), np.uint8), rng.integers(0, 10, 20),
                                PRESETS["fashion-mnist"])
    return cfg, train, (records, 100.0, 1)


def test_a_budget_short_of_steps_lowers_several_bits_in_one_step(net, stand_ins):
    """One step left in the budget, 8 -> 4 bits to go: the step lowers in passes (every group, then the least
    sensitive again) and lands on the target, instead of one bit per group and a missed target."""
    base, sites = net
    cfg, train, budget = _one_step_left()
    plan = PrecisionPlan.uniform(sites, 8, None, granularity="kernel")
    lowered_plan, lowered, reducible, _ = impq._lowering_step(cfg, plan, "weights", base, sites, train, 1, 0,
                                                             budget=budget)
    assert lowered > reducible == len(sites.weight_groups("kernel"))  # more than one bit per group
    assert 3.9 < lowered_plan.weight_bits_effective(sites) <= 4.0
    assert min(b for bits in lowered_plan.weights.values() for b in bits) >= 1
    without, n, _, _ = impq._lowering_step(cfg, plan, "weights", base, sites, train, 1, 0)
    assert n <= reducible and without.weight_bits_effective(sites) > 7.0  # no budget: the schedule's one bit


def test_a_budget_step_past_its_count_still_reaches_the_target(net, stand_ins):
    """One step left, 5.x -> 4 bits: one pass over every group, then more than the count's worth of the least
    sensitive ones, because those are small kernels (here the stand-in ranks the first layer's 9-weight kernels
    least sensitive); the count alone stopped above the target (EfficientNet-Lite0: 4.0013 for 4)."""
    base, sites = net
    cfg, train, budget = _one_step_left()
    plan = PrecisionPlan.uniform(sites, 5, None, granularity="kernel")
    largest = max(sites.layers, key=lambda layer: layer.kernel_params)
    plan.weights[largest.node] = [6] * largest.kernels  # the bits above 5 sit in the largest kernels
    first = min(layer.kernel_params for layer in sites.layers)
    assert first * 4 < largest.kernel_params and plan.weight_bits_effective(sites) > 5.0
    lowered_plan, lowered, reducible, _ = impq._lowering_step(cfg, plan, "weights", base, sites, train, 1, 0,
                                                             budget=budget)
    assert lowered > reducible
    assert 3.9 < lowered_plan.weight_bits_effective(sites) <= 4.0


def test_act_clip_mse_fits_the_clips_at_the_start_and_refits_each_lowered_site(net, tmp_path, stand_ins):
    """act_clip mse: the activation phase's start gives every site the least-squares clip at the start bits;
    each lowering refits exactly the sites it lowered (their clip changes, the others' do not). paper keeps the
    batch-norm clips throughout."""
    options = dict(phases="activations", start_act_bits=4, max_iterations=2, target_act_bits=None)
    mse, work = _run(net, tmp_path, act_clip="mse", **options)
    paper, paper_work = _run(net, tmp_path / "paper", **options)
    plans = [PrecisionPlan.load(work.iteration_dir(r.iteration) / "plan.yaml") for r in mse.records]
    paper_plans = [PrecisionPlan.load(paper_work.iteration_dir(r.iteration) / "plan.yaml") for r in paper.records]
    assert all(p.clips == paper_plans[0].clips for p in paper_plans)
    fitted = {t for t, c in plans[0].clips.items() if c != paper_plans[0].clips[t]}
    assert fitted  # a batch-norm clip of these random-weight sites is not the least-squares one
    for before, after in zip(plans, plans[1:]):
        lowered = {t for t in after.activations if after.activations[t] != before.activations[t]}
        changed = {t for t in after.clips if after.clips[t] != before.clips[t]}
        assert lowered and changed <= lowered and len(changed) >= len(lowered) - 1


def test_act_clip_learned_keeps_the_clips_a_kept_fine_tune_learned(net, tmp_path, stand_ins, monkeypatch):
    """act_clip learned: the fine-tune is asked to learn the clips (LSQ's scale times 300); the clips it returns
    are evaluated with it and go into the iteration's plan when the guard keeps it, and not when it drops it.
    Stand-in fine-tunes return each site's clip halved when asked to learn; accuracy is scripted from the clips."""
    asked = []

    def learning_fine_tune(model, plan, sites, batches, *, steps, learn_clips=0.0, **kwargs):
        asked.append(learn_clips)
        return TrainedWeights({}, [0.1] * steps, steps, steps, 0.0,
                              clips={t: plan.clips[t].value / 2 for t in plan.activations} if learn_clips else {})

    monkeypatch.setattr(iteration, "fine_tune", learning_fine_tune)
    options = dict(phases="activations", start_act_bits=4, max_iterations=2, target_act_bits=None)
    stand_ins["accuracy"] = lambda plan: 0.9  # the guard keeps a fine-tune that validates as well
    kept, work = _run(net, tmp_path / "kept", act_clip="learned", **options)
    assert asked and set(asked) == {iteration.LEARNED_CLIP_GRADIENT_SCALE}
    plans = [PrecisionPlan.load(work.iteration_dir(r.iteration) / "plan.yaml") for r in kept.records]
    mse, mse_work = _run(net, tmp_path / "mse", act_clip="mse", **options)
    fitted = PrecisionPlan.load(mse_work.iteration_dir(mse.records[0].iteration) / "plan.yaml")
    assert all(plans[0].clips[t].value == fitted.clips[t].value / 2 for t in fitted.activations)
    # scripted: a plan whose clips were learned (below the fitted ones) validates worse, so the guard drops it
    stand_ins["accuracy"] = lambda plan: 0.5 if any(plan.clips[t].value < fitted.clips[t].value
                                                    for t in plan.activations) else 0.9
    dropped, dropped_work = _run(net, tmp_path / "dropped", act_clip="learned", guard=True, **options)
    first = PrecisionPlan.load(dropped_work.iteration_dir(dropped.records[0].iteration) / "plan.yaml")
    assert dropped.records[0].extra["fine_tune_kept"] is False and first.clips == fitted.clips


def test_keep_ends_floors_the_first_and_last_layers_and_starts_them_there(net, tmp_path, stand_ins):
    """keep_ends: the first and last layers' kernels and input sites start at max(start, floor) and are never
    lowered below it, while every other group goes down to 1 bit (the stand-in ranking lowers everything)."""
    _, sites = net
    assert impq.end_layers(sites) == ("conv1", "fc")
    state, work = _run(net, tmp_path, granularity="kernel", phases="weights-activations", start_bits=2,
                       start_act_bits=3, keep_ends=4, max_iterations=10)
    plans = [PrecisionPlan.load(work.iteration_dir(r.iteration) / "plan.yaml") for r in state.records]
    weight_start = next(p for p, r in zip(plans, state.records) if r.phase == "weights")
    assert weight_start.weights["conv1"] == [4] * 16 and weight_start.weights["fc"] == [4] * 10
    assert weight_start.weights["conv2"] == [2] * 32
    last = plans[-1]
    assert last.weights["conv1"] == [4] * 16 and last.weights["fc"] == [4] * 10
    assert all(b == 1 for layer in ("conv2", "conv3", "conv4") for b in last.weights[layer])
    assert last.activations["input"] == 4 and last.activations["flatten.out"] == 4
    assert {last.activations[t] for t in ("relu1.out", "relu2.out", "relu3.out")} == {1}
    assert state.stop == "all_groups_at_1_bit"
    # a floor below the start bits lowers the ends down to the floor and no further
    state, work = _run(net, tmp_path / "below", granularity="layer", phases="weights", start_bits=6,
                       keep_ends=3, max_iterations=10)
    last = PrecisionPlan.load(work.iteration_dir(state.records[-1].iteration) / "plan.yaml")
    assert last.weights["conv1"] == [3] * 16 and last.weights["conv2"] == [1] * 32

"""A time budget that lands (search/budget.py): the groups per step that reach the target in the time left,
on records of a real run with their seconds set (the decision reads only committed records)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from impq_onnx.search.budget import budget_groups

V1 = Path(__file__).parent / "data" / "v1"


def _records(*seconds: float):
    from impq_onnx.search.state import IterationRecord

    row = json.loads((V1 / "faq.iterations.json").read_text())[0]
    base = IterationRecord.from_dict(row)
    return [dataclasses.replace(base, iteration=i, seconds=s) for i, s in enumerate(seconds)]


def _groups(**kw):
    args = dict(scheduled=10, reducible=100, bits_now=8.0, bits_all_lowered=7.0, target=4.0, time_budget=1000.0,
                elapsed=100.0, records=_records(100.0), phases_left=1)
    args.update(kw)
    return budget_groups(**args)


def test_enough_time_keeps_the_schedule():
    # 9 iterations left at 100 s each; 4 bits to remove at 0.1 bit per step (10 of 100 groups) needs 40 steps:
    # the budget asks for 4 / (9 * 1.0) = 45 % of the groups per step
    assert _groups() == 45
    assert _groups(time_budget=100_000.0) == 10  # 999 steps left: the schedule's 10 suffice


def test_time_left_for_one_step_lowers_everything_needed():
    assert _groups(time_budget=250.0) == 400  # one step left, 4 bits needed: four passes over every group
    assert _groups(time_budget=250.0, target=7.5) == 50  # half a bit in one step: half the groups
    assert _groups(elapsed=5000.0) == 400  # past the budget already: all of it in the next step


def test_later_phases_and_their_starts_share_the_time():
    # 9 iterations, one of them the activation phase's start, 8 shared by two phases: 4 steps each
    assert _groups(phases_left=2) == 100  # 4 bits in 4 steps at 1 bit per step: all groups
    assert _groups(phases_left=2, target=6.0) == 50


def test_the_estimate_is_the_median_of_the_last_three_iterations():
    assert _groups(records=_records(10.0, 100.0, 100.0, 10_000.0)) == 45  # median 100 s of the last three
    assert _groups(records=_records(300.0, 300.0, 300.0)) == 134  # 3 iterations left, 4 bits: 4/3 bit a step


def test_no_budget_no_target_or_target_reached_keep_the_schedule():
    assert _groups(time_budget=None) == 10
    assert _groups(target=None) == 10
    assert _groups(bits_now=4.0) == 10
    assert _groups(records=[]) == 10  # nothing measured yet
    assert _groups(bits_all_lowered=8.0) == 10  # nothing reducible changes the width


def test_the_one_off_learning_rate_probe_is_not_an_iteration_s_time():
    # The run's first fine-tune derives the learning rate (lr_probe_seconds: 400 s here); the estimate reads the
    # iterations' own 100 s, as a run given --lr would.
    probed = _records(500.0)
    probed[0].extra.update(lr_derived={"lr": 0.0015}, lr_probe_seconds=400.0)
    assert _groups(records=probed) == _groups(records=_records(100.0)) == 45


def _end_steps(**kw):
    from impq_onnx.search.budget import affordable_end_steps

    # the EfficientNet-Lite0 run: iterations of ~157 s whose 60-step fine-tunes took 110 s (1.83 s a step)
    records = [dataclasses.replace(r, fine_tune_steps=60, fine_tune_seconds=110.0)
               for r in _records(157.0, 163.0, 157.0)]
    args = dict(steps=240, base_steps=60, time_budget=1200.0, elapsed=896.0, records=records, phases_left=1)
    args.update(kw)
    return affordable_end_steps(**args)


def test_the_landing_fine_tune_is_cut_to_the_time_left():
    # 304 s left, one ordinary iteration (157 s) reserved: 147 s pay for 80 extra steps of 1.83 s
    assert _end_steps() == 60 + 80
    assert _end_steps(time_budget=100_000.0) == 240  # time enough: the whole end_steps_factor
    assert _end_steps(time_budget=1000.0) == 60  # less than an iteration left: never below the ordinary steps
    assert _end_steps(phases_left=2) == 60  # a later phase shares the 304 s: 152 s, less than an iteration
    assert _end_steps(phases_left=2, time_budget=1500.0) == 60 + 79  # (604 / 2 - 157) / 1.83


def test_no_budget_or_no_end_factor_keeps_the_steps():
    assert _end_steps(time_budget=None) == 240
    assert _end_steps(steps=60) == 60
    assert _end_steps(records=[]) == 240

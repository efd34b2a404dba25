"""A time budget that lands: how many groups a lowering step must lower to reach the target in the time left.

With ``time_budget`` and a phase target, the schedule's ``N`` per iteration is a floor, not a promise: a
224-px model whose iterations take minutes would otherwise spend the budget lowering a few groups at a time
and stop far above the target (issue: a 15-minute budget stopped at B_w,eff 4.24 for a target of 4). Before
each lowering step :func:`budget_groups` estimates

- the seconds one iteration takes: the median of the run's last three iterations (committed, so a resumed
  run decides the same), less the learning-rate probe of the run's first fine-tune (done once);
- the iterations the budget still holds: ``(time_budget - elapsed) / seconds``, less one start iteration
  for every phase not started yet, shared equally among the phases left;
- the bits one step removes: lowering the fraction ``f`` of the reducible groups removes about
  ``f * (B_now - B_all)`` effective bits, where ``B_all`` is the effective width with every reducible
  group one bit lower;

and returns the group count that reaches the target in that many steps (at least the schedule's count). A
count above the reducible groups means more than one bit per group in this step: the step then lowers in
passes, every reducible group by one bit and then the least sensitive again, until the count is used
(a 300-second budget on a 224-px model holds one lowering step, and 8 -> 4 bits needs four bits off most
groups) and the effective bits the count stands for are reached (the count assumes groups of average size;
the least sensitive are often small ones). ``land_on_target`` trims the last pass so it stops at the target.
A group never goes below one bit, so a target below that is missed (exit 4), never met by a silent shortfall.
The lowering that lands a phase fine-tunes ``end_steps_factor`` times longer; :func:`affordable_end_steps`
cuts that to what the budget still holds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from impq_onnx.search.state import IterationRecord

__all__ = ["budget_groups", "affordable_end_steps", "MAX_PASSES"]

MAX_PASSES = 32  # bits one step may take off a group at most (a weight group never goes below 1 bit anyway)


def budget_groups(*, scheduled: int, reducible: int, bits_now: float, bits_all_lowered: float, target: float | None,
                  time_budget: float | None, elapsed: float, records: Sequence[IterationRecord],
                  phases_left: int) -> int:
    """Groups to lower this step (see the module docstring): ``scheduled`` unless the budget needs more.

    ``bits_now`` / ``bits_all_lowered``: the phase's effective bits now and with every one of the
    ``reducible`` groups one bit lower; ``phases_left`` counts this (started) phase, so each of the other
    ``phases_left - 1`` still has its start iteration to come."""
    if time_budget is None or target is None or not records or reducible <= 0 or bits_now <= target + 1e-9:
        return scheduled
    seconds = statistics.median(_seconds(r) for r in records[-3:])
    if seconds <= 0:
        return scheduled
    left = math.floor((time_budget - elapsed) / seconds) - (phases_left - 1)
    steps = max(1, left // max(1, phases_left))
    per_step_all = bits_now - bits_all_lowered  # bits removed when every reducible group loses one
    if per_step_all <= 0:
        return scheduled
    fraction = (bits_now - target) / (steps * per_step_all)
    return int(min(reducible * MAX_PASSES, max(scheduled, math.ceil(fraction * reducible - 1e-9))))


def affordable_end_steps(*, steps: int, base_steps: int, time_budget: float | None, elapsed: float,
                         records: Sequence[IterationRecord], phases_left: int) -> int:
    """The fine-tune steps of the lowering that lands a phase (``steps``: ``end_steps_factor`` times
    ``base_steps``), cut to what the time budget still holds: this phase's share of the time left (shared
    equally with the ``phases_left - 1`` phases to come, as :func:`budget_groups` shares it), less one
    ordinary iteration (the median of the last three), pays for the extra steps at the run's seconds per
    fine-tune step (median of the same iterations). Never below ``base_steps``; committed figures only, so
    a resumed run decides the same. (EfficientNet-Lite0, a 20-minute budget: the landing fine-tune of 4x60
    steps took 437 s where the budget had 300 s left, and the run ended at 1,380 s.)"""
    recent = [r for r in records[-3:] if r.fine_tune_steps > 0 and r.fine_tune_seconds > 0]
    if time_budget is None or steps <= base_steps or not recent:
        return steps
    per_step = statistics.median(r.fine_tune_seconds / r.fine_tune_steps for r in recent)
    share = (time_budget - elapsed) / max(1, phases_left) - statistics.median(_seconds(r) for r in recent)
    extra = math.floor(share / per_step + 1e-9)
    return base_steps + max(0, min(steps - base_steps, extra))


def _seconds(record: IterationRecord) -> float:
    """The record's seconds without the one-off learning-rate probe (``lr_probe_seconds``) it may hold."""
    return record.seconds - float(record.extra.get("lr_probe_seconds", 0.0))

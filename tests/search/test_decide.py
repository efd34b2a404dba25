"""The one stop decision every strategy takes (search/iteration.py: decide), on records of a real run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from impq_onnx.compression import CompressConfig
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.search.checkpoint import WorkDir
from impq_onnx.search.iteration import decide
from impq_onnx.search.state import IterationRecord, SearchContext, SearchState

V1 = Path(__file__).parent / "data" / "v1"


def _record(top1: float, iteration: int) -> IterationRecord:
    row = json.loads((V1 / "faq.iterations.json").read_text())[0]
    record = IterationRecord.from_dict(row)
    return dataclasses.replace(record, iteration=iteration, val_top1=top1, within_accuracy_drop=None, stop=None)


def _decide(record: IterationRecord, state: SearchState, *, early: bool, end: str | None = None,
            **options) -> list[str]:
    cfg = CompressConfig(model="m.onnx", data="d", **options)
    context = SearchContext(cfg, None, None, None, None, WorkDir("unused"), {"top1": 0.80})
    asked = []

    def ends() -> str | None:
        asked.append("end")
        return end

    decide(context, state, record, end=ends, early=early)
    return asked


@pytest.mark.parametrize("early", [True, False])
def test_within_the_drop_the_strategy_end_decides(early):
    state = SearchState(PrecisionPlan({}, {}, {}), iteration=3)
    record = _record(0.79, 4)
    assert _decide(record, state, early=early, end="max_iterations", max_accuracy_drop=2.0) == ["end"]
    assert record.within_accuracy_drop and record.stop == state.stop == "max_iterations"
    assert state.last_good == state.final == 4


def test_the_search_stops_beyond_the_drop_and_keeps_the_last_iteration_within_it():
    state = SearchState(PrecisionPlan({}, {}, {}), iteration=4, last_good=3)
    record = _record(0.70, 5)
    assert _decide(record, state, early=True, max_accuracy_drop=2.0) == []  # the end rule is not asked
    assert record.within_accuracy_drop is False and record.stop == "max_accuracy_drop" and state.final == 3


def test_a_fixed_length_strategy_runs_on_beyond_the_drop_and_outputs_the_last_within():
    state = SearchState(PrecisionPlan({}, {}, {}), iteration=4, last_good=3)
    record = _record(0.70, 5)
    assert _decide(record, state, early=False, max_accuracy_drop=2.0) == ["end"]
    assert record.within_accuracy_drop is False and record.stop is None and state.stop is None
    record = _record(0.70, 6)
    _decide(record, state, early=False, end="max_iterations", max_accuracy_drop=2.0)
    assert state.stop == "max_iterations" and state.final == 3


def test_time_budget_comes_last_and_reads_the_committed_time():
    state = SearchState(PrecisionPlan({}, {}, {}), elapsed=10.0)
    record = _record(0.79, 0)
    _decide(record, state, early=True, time_budget=5.0, target_gbitops=record.gbitops / 2)
    assert record.stop == "time_budget" and state.final == 0

"""N per iteration: fixed counts, fractions of the reducible groups, piecewise schedules."""

from __future__ import annotations

import pytest

from impq_onnx.errors import ConfigError
from impq_onnx.search.schedule import parse_schedule


def test_fixed_count_is_capped_at_the_reducible_groups():
    schedule = parse_schedule(400)
    assert [schedule.groups(i, 1000) for i in range(3)] == [400, 400, 400]
    assert schedule.groups(5, 120) == 120
    assert schedule.groups(0, 0) == 0


@pytest.mark.parametrize("text", ["50%", "0.5", 0.5])
def test_fraction_of_the_reducible_groups(text):
    schedule = parse_schedule(text)
    assert schedule.groups(0, 154) == 77
    assert schedule.groups(0, 5) == 3  # rounded half up
    assert schedule.groups(7, 1) == 1  # never below one while something can be lowered
    assert schedule.groups(0, 0) == 0


def test_piecewise_like_the_reference_code():
    schedule = parse_schedule("400x3,200,150")
    assert [schedule.groups(i, 10_000) for i in range(7)] == [400, 400, 400, 200, 150, 150, 150]
    assert schedule.text() == "400x3,200,150"


def test_piecewise_mixes_counts_and_fractions():
    schedule = parse_schedule("12, 8, 25%x2, 2")
    assert [schedule.groups(i, 40) for i in range(6)] == [12, 8, 10, 10, 2, 2]


@pytest.mark.parametrize("text", ["", "0", "-3", "150%", "abc", "10x0", "10xy", "1.5", True, None, [1]])
def test_bad_schedules_are_one_line_config_errors(text):
    with pytest.raises(ConfigError) as info:
        parse_schedule(text, "schedule")
    assert "\n" not in str(info.value) and str(info.value).startswith("schedule")

"""A new N-per-iteration schedule is one module, one registration line and its tests: this file registers a
toy geometric schedule (as a module under impq_onnx/search/schedules/ would) and runs compress with it."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from impq_onnx.compression import compress
from impq_onnx.errors import ConfigError
from impq_onnx.search.schedule import SCHEDULES, parse_schedule, register_schedule
from impq_onnx.search.schedules.fixed import parse_fixed

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "fashion-mnist" / "model.onnx"
DATA = ROOT / "models" / "fashion-mnist"


@dataclasses.dataclass(frozen=True)
class Geometric:
    """``geometric:START/RATIO``: START groups at the first step, then RATIO times the previous count."""

    start: int
    ratio: float

    def groups(self, step: int, reducible: int) -> int:
        if reducible <= 0:
            return 0
        return min(reducible, max(1, math.floor(self.start * self.ratio**step + 0.5)))

    def text(self) -> str:
        return f"geometric:{self.start}/{self.ratio:g}"


def parse_geometric(arguments: str, source: str) -> Geometric:
    start, _, ratio = arguments.partition("/")
    try:
        return Geometric(int(start), float(ratio))
    except ValueError:
        raise ConfigError(f"{source}: '{arguments}' is not START/RATIO (e.g. 400/0.5)") from None


@pytest.fixture
def geometric():
    register_schedule("geometric", parse_geometric)
    yield
    del SCHEDULES["geometric"]


def test_registered_schedule_text_parses_to_it(geometric):
    parsed = parse_schedule("geometric:400/0.5")
    assert parsed == Geometric(400, 0.5) and parsed.text() == "geometric:400/0.5"
    assert [parsed.groups(i, 1000) for i in range(4)] == [400, 200, 100, 50]
    with pytest.raises(ConfigError, match="^schedule: 'x/y' is not START/RATIO"):
        parse_schedule("geometric:x/y")


@pytest.mark.skipif(not MODEL.is_file(), reason="the bundled Fashion-MNIST model is not built yet")
def test_compress_runs_with_a_registered_schedule(tmp_path, geometric):
    result = compress(MODEL, DATA, output=tmp_path / "geo.onnx", progress=False, phases="weights",
                      schedule="geometric:8/0.5", steps=2, start_steps=2, sensitivity_samples=32, max_val_samples=40,
                      batch_size=16, max_iterations=3, target_bits=None, target_act_bits=None)
    assert [r.lowered for r in result.iterations] == [0, 8, 4, 2]
    assert result.iterations[1].reducible > 8 and result.stop_reason == "max_iterations"
    saved = json.loads(result.paths["report"].read_text())
    assert saved["config"]["schedule"] == "geometric:8/0.5"


def test_built_in_schedules_by_name_and_unnamed():
    assert parse_schedule("fixed:400").groups(3, 1000) == 400
    assert parse_schedule("fraction:50%").groups(0, 154) == 77
    assert parse_schedule("piecewise:400x3,200").text() == parse_schedule("400x3,200").text() == "400x3,200"
    assert sorted(SCHEDULES) == ["fixed", "fraction", "piecewise"]


@pytest.mark.parametrize("text, message", [
    ("geometric:8/0.5", "'geometric' is not a schedule; give one of fixed, fraction, piecewise as NAME:ARGUMENTS"),
    ("fixd:400", "did you mean 'fixed'"),
    ("fixed:0", "'0' is not a group count"),
    ("fraction:150%", "must be a fraction in (0, 1]"),
])
def test_unknown_names_and_bad_arguments_are_one_line_errors(text, message):
    with pytest.raises(ConfigError) as info:
        parse_schedule(text, "act_schedule")
    assert message in str(info.value) and str(info.value).startswith("act_schedule: ") and "\n" not in str(info.value)


def test_a_name_is_registered_once(geometric):
    with pytest.raises(ValueError, match="already registered"):
        register_schedule("geometric", parse_fixed)

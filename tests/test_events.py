"""Progress events: their JSON form, their plain line, and the throttled plain printer."""

from __future__ import annotations

import io
import json

from impq_onnx.events import Event, PlainLines, nested, progress_callback


def test_json_has_a_fixed_key_order_and_no_nan():
    event = Event("step", "fine-tune", "fine-tune step 1/3", 1, 3, {"lr": 0.1, "loss": float("nan")})
    line = event.to_json()
    assert list(json.loads(line)) == ["kind", "phase", "step", "total", "message", "data"]
    assert json.loads(line)["data"] == {"loss": None, "lr": 0.1}
    assert line.index('"loss"') < line.index('"lr"')  # data sorted by key
    assert "\n" not in line and str(event) == "fine-tune step 1/3"


def test_nested_events_indent_the_plain_line_or_hide_it():
    seen: list[Event] = []
    nested(seen.append)(Event("message", "compress", "hello"))
    nested(seen.append, plain=False)(Event("message", "compress", "quiet"))
    assert str(seen[0]) == "  hello" and seen[0].plain and not seen[1].plain
    assert seen[0].to_dict()["message"] == "hello"  # the indent is not part of the data


def test_plain_lines_throttle_steps_but_print_the_end():
    out = io.StringIO()
    lines = PlainLines(interval=3600.0, stream=out)
    lines(Event("phase_start", "fine-tune", "", 0, 3))
    for step in (1, 2, 3):
        lines(Event("step", "fine-tune", f"step {step}", step, 3))
    lines(Event("phase_end", "fine-tune", "step 3", 3, 3))
    lines(Event("message", "compress", "hidden", plain=False))
    assert out.getvalue() == "step 3\n"
    out = io.StringIO()
    every = PlainLines(interval=0.0, stream=out)
    for step in (1, 2):
        every(Event("step", "evaluate", f"evaluate {step}", step))
    assert out.getvalue() == "evaluate 1\nevaluate 2\n"


def test_progress_argument_forms():
    assert progress_callback(False) is None and isinstance(progress_callback(True), PlainLines)
    assert progress_callback(print) is print

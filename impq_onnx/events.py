"""Structured progress events: what the library reports while it works, for people and for pipelines.

Every long operation (``fine_tune``, ``evaluate``, ``noise_gain``, the search loop, ``compress``)
takes ``progress``: ``False`` (nothing), ``True`` (the plain lines on stderr, as ever) or a callable
that receives each :class:`Event`. An event is typed and frozen: ``kind`` (what happened),
``phase`` (the activity), ``step`` / ``total`` (how far), ``message`` (the plain line) and ``data``
(the figures: loss, B_w,eff, top-1...). ``str(event)`` is the plain line, indented under its parent,
so a consumer of the old string callbacks reads ``str(event)``; ``to_json()`` is one JSON line with
a fixed key order (``impq-onnx ... --events``).

Kinds: ``phase_start`` (an activity begins; ``total`` when known), ``step`` (one unit done: a
fine-tune step, an evaluated batch, measured samples), ``phase_end`` (the activity ended; its result
in ``data``), ``iteration`` (a search iteration committed: its record in ``data``), ``message`` (a
line of information) and ``done`` (the whole run finished).

Phases: ``fine-tune``, ``evaluate``, ``sensitivity``, ``search``, ``refit`` (``--refit-epochs``), ``compress``,
``verify``.

This module is part of the base layer: it imports nothing of the package.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["KINDS", "PHASES", "Event", "Progress", "PlainLines", "json_safe", "lowering_text", "nested",
           "progress_callback", "silent"]

KINDS = ("phase_start", "step", "phase_end", "iteration", "message", "done")
PHASES = ("fine-tune", "evaluate", "sensitivity", "search", "refit", "compress", "verify")


@dataclasses.dataclass(frozen=True)
class Event:
    """One progress event (see the module docstring). ``level`` indents the plain line under its parent;
    ``plain`` False keeps it off the plain lines (the figures are still there for bars and pipelines)."""

    kind: str
    phase: str
    message: str = ""
    step: int | None = None
    total: int | None = None
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    level: int = 0
    plain: bool = True

    def __str__(self) -> str:
        return "  " * self.level + self.message

    def to_dict(self) -> dict[str, Any]:
        """``kind, phase, step, total, message, data`` in that order; ``data`` sorted by key; floats that are
        not finite become None (JSON has no NaN)."""
        return {"kind": self.kind, "phase": self.phase, "step": self.step, "total": self.total,
                "message": self.message, "data": {k: json_safe(self.data[k]) for k in sorted(self.data)}}

    def to_json(self) -> str:
        """One line of JSON (``--events``)."""
        return json.dumps(self.to_dict(), allow_nan=False, separators=(", ", ": "))


Progress = Callable[[Event], None]


def json_safe(value: Any) -> Any:
    """``value`` with every float that is not finite (in dicts, lists) replaced by None: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class PlainLines:
    """The plain progress lines on stderr (``progress=True``): every event with a message, except that
    ``step`` lines come at most every ``interval`` seconds per phase (``phase_end`` gives the final one)."""

    def __init__(self, interval: float = 2.0, stream: Any = None) -> None:
        self.interval = interval
        self.stream = stream
        self._last: dict[str, float] = {}

    def __call__(self, event: Event) -> None:
        now = time.perf_counter()
        if event.kind == "phase_start":
            self._last[event.phase] = now
        if not event.plain or not event.message:
            return
        if event.kind == "step":  # the phase_end event repeats the last one
            if now - self._last.setdefault(event.phase, now) < self.interval:
                return
            self._last[event.phase] = now
        print(str(event), file=self.stream if self.stream is not None else sys.stderr, flush=True)


def silent(event: Event) -> None:
    """A callback that drops every event."""


def progress_callback(progress: bool | Progress | None) -> Progress | None:
    """The callable behind a ``progress`` argument: itself, :class:`PlainLines` for True, None for False."""
    if callable(progress):
        return progress
    return PlainLines() if progress else None


def nested(progress: Progress | None, *, plain: bool = True) -> Progress | None:
    """``progress`` for an inner activity: its plain lines indented one level (``plain`` False: kept off the
    plain lines altogether)."""
    if progress is None:
        return None
    outer = progress

    def inner(event: Event) -> None:
        outer(dataclasses.replace(event, level=event.level + 1, plain=event.plain and plain))

    return inner


def lowering_text(lowered: int, reducible: int | None) -> str:
    """What a lowering step did, for an iteration's line: ``-1 bit on 77/154`` (groups lowered / reducible);
    a step that lowered in several passes (a time budget short of steps) counts one-bit lowerings:
    ``-400 bits on 100 groups``."""
    if reducible is None or lowered <= reducible:
        return f"-1 bit on {lowered}/{reducible}"
    return f"-{lowered} bits on {reducible} groups"


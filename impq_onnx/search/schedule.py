"""How many groups one IMPQ lowering step lowers: the registry of N-per-iteration schedules.

Text form (the CLI and YAML use it): ``NAME:ARGUMENTS`` picks the schedule registered as ``NAME``
(``fixed:400``, ``fraction:50%``, ``piecewise:400x3,200,150``); text without a name is the piecewise
form (:mod:`impq_onnx.search.schedules.piecewise`): ``400``, ``50%``, ``0.5``, ``400x3,200,150``.

A new schedule is one module under :mod:`impq_onnx.search.schedules` (a class with ``groups(step,
reducible)`` and ``text()``, and a ``parse(arguments, source)`` that raises a one-line
:class:`~impq_onnx.errors.ConfigError` naming ``source``), one line in :data:`SCHEDULES`, and its tests.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from impq_onnx.errors import ConfigError
from impq_onnx.search.schedules.fixed import parse_fixed
from impq_onnx.search.schedules.fraction import parse_fraction
from impq_onnx.search.schedules.piecewise import parse_piecewise

__all__ = ["SCHEDULES", "Schedule", "ScheduleParser", "parse_schedule", "register_schedule"]


@runtime_checkable
class Schedule(Protocol):
    """Groups to lower at lowering step ``step`` of a phase (from 0) when ``reducible`` groups can still lose
    a bit: at most ``reducible``, and at least 1 while ``reducible > 0``."""

    def groups(self, step: int, reducible: int) -> int: ...

    def text(self) -> str: ...


ScheduleParser = Callable[[str, str], Schedule]  # (arguments, source) -> the schedule

SCHEDULES: dict[str, ScheduleParser] = {
    "fixed": parse_fixed,
    "fraction": parse_fraction,
    "piecewise": parse_piecewise,
}


def register_schedule(name: str, parse: ScheduleParser) -> None:
    """Make ``NAME:ARGUMENTS`` schedule text mean ``parse(ARGUMENTS, source)``."""
    if not name.isidentifier():
        raise ValueError(f"schedule name {name!r} must be an identifier (letters, digits, _)")
    if SCHEDULES.get(name, parse) is not parse:
        raise ValueError(f"schedule name {name!r} is already registered")
    SCHEDULES[name] = parse


def parse_schedule(value: str | int | float | Schedule, source: str = "schedule") -> Schedule:
    """The :class:`Schedule` of its text form (or a plain count / fraction); see the module docstring."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{source}: expected text like '50%' or '400x3,200,150', not {value!r}")
    text = str(value).replace(" ", "")
    if not text:
        raise ConfigError(f"{source}: empty schedule; give e.g. '50%' or '400x3,200,150'")
    name, sep, arguments = text.partition(":")
    if not sep:
        return parse_piecewise(text, source)
    if name not in SCHEDULES:
        close = difflib.get_close_matches(name, SCHEDULES, n=1, cutoff=0.6)
        raise ConfigError(f"{source}: '{name}' is not a schedule{f' (did you mean {close[0]!r}?)' if close else ''};"
                          f" give one of {', '.join(sorted(SCHEDULES))} as NAME:ARGUMENTS, or a count like 400 or 50%")
    return SCHEDULES[name](arguments, source)

"""How many groups one IMPQ iteration lowers: a fixed count, a fraction of the reducible groups, or
a piecewise list of either (the reference code's "400 for iterations 0-2, then 200, then 150").

Text form (the CLI and YAML use it): comma-separated entries ``VALUE[xREPEAT]``; ``VALUE`` is a count
(``400``), a percentage (``50%``) or a fraction below 1 (``0.5``) of the groups that can still be
lowered; ``xREPEAT`` says for how many iterations the entry holds (default 1); the last entry holds
for every later iteration. ``"400x3,200,150"`` is 400, 400, 400, 200, 150, 150, ...
A fraction is rounded half up and at least 1; a count is capped at the reducible groups.
"""

from __future__ import annotations

import dataclasses
import math

from impq_onnx.errors import ConfigError

__all__ = ["Schedule", "ScheduleEntry", "parse_schedule"]


@dataclasses.dataclass(frozen=True)
class ScheduleEntry:
    count: int | None  # a fixed number of groups, or
    fraction: float | None  # a fraction of the reducible groups
    repeat: int = 1

    def groups(self, reducible: int) -> int:
        if reducible <= 0:
            return 0
        if self.count is not None:
            return min(self.count, reducible)
        return min(reducible, max(1, math.floor(self.fraction * reducible + 0.5)))

    def text(self) -> str:
        value = str(self.count) if self.count is not None else f"{self.fraction * 100:g}%"
        return value if self.repeat == 1 else f"{value}x{self.repeat}"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Groups to lower at each iteration of a phase (``iteration`` counts the phase's lowering steps from 0)."""

    entries: tuple[ScheduleEntry, ...]

    def entry(self, iteration: int) -> ScheduleEntry:
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, not {iteration}")
        for entry in self.entries[:-1]:
            if iteration < entry.repeat:
                return entry
            iteration -= entry.repeat
        return self.entries[-1]

    def groups(self, iteration: int, reducible: int) -> int:
        return self.entry(iteration).groups(reducible)

    def text(self) -> str:
        return ",".join(entry.text() for entry in self.entries)


def _value(text: str, source: str) -> tuple[int | None, float | None]:
    try:
        if text.endswith("%"):
            fraction = float(text[:-1]) / 100.0
        elif "." in text or "e" in text.lower():
            fraction = float(text)
            if fraction >= 1.0:
                if fraction != int(fraction):
                    raise ValueError
                return int(fraction), None
        else:
            count = int(text)
            if count < 1:
                raise ValueError
            return count, None
    except ValueError as exc:
        raise ConfigError(
            f"{source}: '{text}' is not a group count (400), a percentage (50%) or a fraction (0.5)") from exc
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"{source}: '{text}' must be a fraction in (0, 1] or a percentage in (0%, 100%]")
    return None, fraction


def parse_schedule(value: "str | int | float | Schedule", source: str = "schedule") -> Schedule:
    """A :class:`Schedule` from its text form (or a plain count / fraction); see the module docstring."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{source}: expected text like '50%' or '400x3,200,150', not {value!r}")
    text = str(value).replace(" ", "")
    if not text:
        raise ConfigError(f"{source}: empty schedule; give e.g. '50%' or '400x3,200,150'")
    entries = []
    for part in text.split(","):
        head, sep, repeat_text = part.partition("x")
        repeat = 1
        if sep:
            if not repeat_text.isdigit() or int(repeat_text) < 1:
                raise ConfigError(f"{source}: '{part}': the repeat after 'x' must be a positive integer")
            repeat = int(repeat_text)
        count, fraction = _value(head, source)
        entries.append(ScheduleEntry(count, fraction, repeat))
    return Schedule(tuple(entries))

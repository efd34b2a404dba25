"""``400x3,200,150``: a list of fixed counts and fractions, each for a number of steps (the reference
code's "400 for iterations 0-2, then 200, then 150"); also the form of schedule text without a name.

Comma-separated entries ``VALUE[xREPEAT]``; ``VALUE`` is a count (``400``), a percentage (``50%``) or a
fraction below 1 (``0.5``) of the groups that can still be lowered (:mod:`.fixed`, :mod:`.fraction`);
``xREPEAT`` says for how many steps the entry holds (default 1); the last entry holds for every later
step. ``"400x3,200,150"`` is 400, 400, 400, 200, 150, 150, ...
"""

from __future__ import annotations

import dataclasses

from impq_onnx.errors import ConfigError
from impq_onnx.search.schedules.fixed import FixedCount
from impq_onnx.search.schedules.fraction import Fraction

__all__ = ["Piecewise", "parse_piecewise"]


@dataclasses.dataclass(frozen=True)
class Piecewise:
    """Groups to lower at each lowering step of a phase (``step`` counts the phase's steps from 0)."""

    entries: tuple[tuple[FixedCount | Fraction, int], ...]  # (schedule, steps it holds for)

    def entry(self, step: int) -> FixedCount | Fraction:
        if step < 0:
            raise ValueError(f"step must be >= 0, not {step}")
        for entry, repeat in self.entries[:-1]:
            if step < repeat:
                return entry
            step -= repeat
        return self.entries[-1][0]

    def groups(self, step: int, reducible: int) -> int:
        return self.entry(step).groups(step, reducible)

    def text(self) -> str:
        return ",".join(entry.text() if repeat == 1 else f"{entry.text()}x{repeat}" for entry, repeat in self.entries)


def _value(text: str, source: str) -> FixedCount | Fraction:
    try:
        if text.endswith("%"):
            fraction = float(text[:-1]) / 100.0
        elif "." in text or "e" in text.lower():
            fraction = float(text)
            if fraction >= 1.0:
                if fraction != int(fraction):
                    raise ValueError
                return FixedCount(int(fraction))
        else:
            count = int(text)
            if count < 1:
                raise ValueError
            return FixedCount(count)
    except ValueError as exc:
        raise ConfigError(
            f"{source}: '{text}' is not a group count (400), a percentage (50%) or a fraction (0.5)") from exc
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"{source}: '{text}' must be a fraction in (0, 1] or a percentage in (0%, 100%]")
    return Fraction(fraction)


def parse_piecewise(arguments: str, source: str) -> Piecewise:
    """The piecewise schedule of ``arguments`` (see the module docstring)."""
    entries = []
    for part in arguments.split(","):
        head, sep, repeat_text = part.partition("x")
        repeat = 1
        if sep:
            if not repeat_text.isdigit() or int(repeat_text) < 1:
                raise ConfigError(f"{source}: '{part}': the repeat after 'x' must be a positive integer")
            repeat = int(repeat_text)
        entries.append((_value(head, source), repeat))
    return Piecewise(tuple(entries))

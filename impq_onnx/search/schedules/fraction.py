"""``fraction:50%``: a fraction of the groups that can still be lowered, rounded half up and at least 1."""

from __future__ import annotations

import dataclasses
import math

from impq_onnx.errors import ConfigError

__all__ = ["Fraction", "parse_fraction"]


@dataclasses.dataclass(frozen=True)
class Fraction:
    fraction: float

    def groups(self, step: int, reducible: int) -> int:
        if reducible <= 0:
            return 0
        return min(reducible, max(1, math.floor(self.fraction * reducible + 0.5)))

    def text(self) -> str:
        return f"{self.fraction * 100:g}%"


def parse_fraction(arguments: str, source: str) -> Fraction:
    """``50%`` or ``0.5``: a fraction in (0, 1]."""
    try:
        fraction = float(arguments[:-1]) / 100.0 if arguments.endswith("%") else float(arguments)
    except ValueError as exc:
        raise ConfigError(f"{source}: '{arguments}' is not a percentage (50%) or a fraction (0.5)") from exc
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"{source}: '{arguments}' must be a fraction in (0, 1] or a percentage in (0%, 100%]")
    return Fraction(fraction)

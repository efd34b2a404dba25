"""``fixed:400``: the same number of groups at every lowering step (capped at the reducible groups)."""

from __future__ import annotations

import dataclasses

from impq_onnx.errors import ConfigError

__all__ = ["FixedCount", "parse_fixed"]


@dataclasses.dataclass(frozen=True)
class FixedCount:
    count: int

    def groups(self, step: int, reducible: int) -> int:
        return min(self.count, reducible) if reducible > 0 else 0

    def text(self) -> str:
        return str(self.count)


def parse_fixed(arguments: str, source: str) -> FixedCount:
    """``400`` (a positive integer)."""
    if not arguments.isdigit() or int(arguments) < 1:
        raise ConfigError(f"{source}: '{arguments}' is not a group count (a positive integer like 400)")
    return FixedCount(int(arguments))

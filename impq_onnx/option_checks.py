"""One check for every numeric option of every command: finite, within its range, integer where integer.

A :class:`Bound` per option name; :func:`check_numbers` raises a one-line :class:`ConfigError` naming
the option (``option 'lr'`` for compress and its YAML, ``--batch-size`` for the other commands), so
``nan``, ``inf``, ``0`` or ``-1`` never reach the engine. :func:`target_warnings` says, once, when a
bit target is met before the search starts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from impq_onnx.errors import ConfigError

__all__ = ["Bound", "parse_shape", "check_number", "check_numbers", "COMPRESS", "EVALUATE", "SENSITIVITY", "VERIFY",
           "target_warnings"]

SEED_MAX = 2**32 - 1  # numpy's seeds; derive_seed folds every seed into 31 bits anyway


def parse_shape(value: Any, option: str = "option 'input_shape'") -> tuple[int, ...] | None:
    """``1,3,224,224`` / ``1x3x224x224`` / a list of positive integers as a tuple; None stays None."""
    if value is None:
        return None
    try:
        parts = value.replace("x", ",").split(",") if isinstance(value, str) else list(value)
        shape = tuple(int(str(d).strip()) for d in parts)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{option}: {value!r} is not a comma-separated list of integers, e.g. 1,3,224,224") from exc
    if not shape or any(d <= 0 for d in shape):
        raise ConfigError(f"{option}: {value!r} must contain positive sizes, e.g. 1,3,224,224")
    return shape


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclasses.dataclass(frozen=True)
class Bound:
    """``low <= value <= high`` (``<`` where ``*_open``), finite; an ``int`` when ``integer``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        if self.low is not None and self.high is not None and self.low_open and self.high_open:
            return f"between {_fmt(self.low)} and {_fmt(self.high)} (exclusive)"
        if self.low is not None and self.high is not None and not (self.low_open or self.high_open):
            return f"within {_fmt(self.low)}..{_fmt(self.high)}"
        parts = []
        if self.low is not None:
            parts.append(f"{'greater than' if self.low_open else 'at least'} {_fmt(self.low)}")
        if self.high is not None:
            parts.append(f"{'below' if self.high_open else 'at most'} {_fmt(self.high)}")
        return " and ".join(parts) or "a finite number"

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


def _int(low: float | None, high: float | None = None) -> Bound:
    return Bound(low, high, integer=True)


def check_number(label: str, value: Any, bound: Bound) -> None:
    """A one-line ConfigError unless ``value`` is None or fits ``bound``; ``label`` names the option."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{label}: {value!r} is not {'an integer' if bound.integer else 'a number'}")
    if bound.integer and not isinstance(value, int):
        if not (math.isfinite(value) and value == int(value)):
            raise ConfigError(f"{label}: {value!r} is not an integer")
    if not math.isfinite(value):
        raise ConfigError(f"{label}: {value!r} is not a finite number; give one {bound.describe()}")
    if not bound.holds(value):
        why = " (a group's bits go down to 1 at most: it would never be reached)" if bound is BITS and value < 1 else ""
        raise ConfigError(f"{label}: {value!r} must be {bound.describe()}{why}")


def check_numbers(values: Mapping[str, Any], bounds: Mapping[str, Bound], cli: bool = False) -> None:
    """:func:`check_number` for each option in ``bounds``; labels ``--name`` when ``cli``, else ``option 'name'``."""
    for name, bound in bounds.items():
        if name in values:
            label = "--" + name.replace("_", "-") if cli else f"option '{name}'"
            check_number(label, values[name], bound)


BITS = Bound(1, 16)  # a group's bits go down to 1 and up to 16: a target outside is never reached
COMPRESS = {
    "start_bits": _int(1, 16), "start_act_bits": _int(1, 16), "keep_ends": _int(0, 16),
    "target_bits": BITS, "target_act_bits": BITS,
    "target_gbitops": Bound(0, low_open=True), "max_accuracy_drop": Bound(0, 100),
    "max_iterations": _int(0, 10**6), "steps": _int(1, 10**9), "start_steps": _int(1, 10**9),
    "end_steps_factor": Bound(0, 1000, low_open=True), "refit_epochs": Bound(0, 10**6),
    "refit_average_epochs": _int(0, 10**6), "refit_lr": Bound(0, low_open=True),
    "epochs": Bound(0, 10**6, low_open=True), "time_budget": Bound(0, low_open=True),
    "batch_size": _int(1, 2**16), "lr": Bound(0, low_open=True), "momentum": Bound(0, 1, high_open=True),
    "weight_decay": Bound(0), "sensitivity_samples": _int(1, 10**7), "runner_ups": _int(1, 10**5),
    "seed": _int(0, SEED_MAX), "threads": _int(1, 1024), "replicas": _int(1, 1024),
    "max_val_samples": _int(1), "val_fraction": Bound(0, 1, high_open=True),
}
EVALUATE = {"batch_size": _int(1, 2**16), "limit_per_class": _int(1), "threads": _int(1, 1024)}
SENSITIVITY = {"samples": _int(1, 10**7), "runner_ups": _int(1, 10**5), "top": _int(0), "seed": _int(0, SEED_MAX),
               "threads": _int(1, 1024)}
VERIFY = {"limit_per_class": _int(1), "threads": _int(1, 1024), "logit_tolerance": Bound(low=0.0)}


def target_warnings(cfg) -> list[str]:
    """One line per bit target of an IMPQ run that its start already meets (that phase then lowers nothing)."""
    if cfg.method != "impq":
        return []
    lines = []
    for phase, target, start, names in (("weights", cfg.target_bits, cfg.start_bits, ("target_bits", "start_bits")),
                                        ("activations", cfg.target_act_bits, cfg.start_act_bits,
                                         ("target_act_bits", "start_act_bits"))):
        if phase in cfg.phases and target is not None and target >= start and cfg.keep_ends <= start:
            lines.append(f"option '{names[0]}': {target:g} is already met by {names[1]} {start}; the {phase} "
                         f"phase ends at its start without lowering any bits (lower {names[0]} to search)")
    return lines

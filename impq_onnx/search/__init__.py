"""Search strategies over a precision plan: the IMPQ loop, its N schedules and its work directory, and the
baselines ``compress --method`` offers (:mod:`.methods`: faq, activation-density, uniform-ptq)."""

from __future__ import annotations

from .checkpoint import WorkDir, write_atomic
from .impq import PHASE_ORDERS, derive_seed, pick_least_sensitive, run_search
from .methods import METHODS, strategy
from .schedule import Schedule, parse_schedule

__all__ = ["METHODS", "strategy", "run_search", "derive_seed", "pick_least_sensitive", "PHASE_ORDERS", "Schedule",
           "parse_schedule", "WorkDir", "write_atomic"]

"""Search strategies over a precision plan: the IMPQ loop, its N schedules and its work directory, and the
baselines ``compress --method`` offers (:mod:`.methods`: faq, activation-density, uniform-ptq)."""

from __future__ import annotations

from impq_onnx.search.checkpoint import WorkDir, write_atomic
from impq_onnx.search.impq import PHASE_ORDERS, derive_seed, pick_least_sensitive, run_search
from impq_onnx.search.methods import METHODS, strategy
from impq_onnx.search.schedule import Schedule, parse_schedule

__all__ = ["METHODS", "strategy", "run_search", "derive_seed", "pick_least_sensitive", "PHASE_ORDERS", "Schedule",
           "parse_schedule", "WorkDir", "write_atomic"]

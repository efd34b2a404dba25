"""Search strategies over a precision plan: the IMPQ loop, its N schedules and its work directory, the
baselines ``compress --method`` offers (:mod:`.methods`: faq, activation-density, uniform-ptq), and the
typed state they share (:mod:`.state`).

Modules depend one way: :mod:`.checkpoint` <- :mod:`.state` <- :mod:`.iteration`
(seeds, fine-tune, evaluation, the one stop decision, the commit) <- the strategies (:mod:`.impq`, which
reads :mod:`.schedule`, the registry of :mod:`.schedules`; :mod:`.ptq` <- :mod:`.faq`; :mod:`.density`)
<- :mod:`.methods` (the registry ``compress`` reads).
"""

from __future__ import annotations

from impq_onnx.search.checkpoint import WorkDir, write_atomic
from impq_onnx.search.impq import pick_least_sensitive, run_search
from impq_onnx.search.iteration import derive_seed
from impq_onnx.search.methods import METHODS, strategy
from impq_onnx.search.schedule import Schedule, parse_schedule
from impq_onnx.search.state import FINAL_KEYS, PHASE_ORDERS, IterationRecord, SearchContext, SearchState

__all__ = ["METHODS", "strategy", "run_search", "derive_seed", "pick_least_sensitive", "PHASE_ORDERS", "Schedule",
           "parse_schedule", "WorkDir", "write_atomic", "SearchContext", "SearchState", "IterationRecord",
           "FINAL_KEYS"]

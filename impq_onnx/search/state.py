"""The typed state every search strategy shares: what a run is fixed to, what changes, and one iteration's row.

- :class:`SearchContext`: everything fixed for a run (options, float model, sites, data, work directory,
  the float model's metrics); built once by ``compress``, never changed.
- :class:`SearchState`: what the iterations change (the committed iteration, the phase, the plan and
  fine-tuned values, the wall time, the kept iteration, why the run stopped, the records). Its
  :meth:`SearchState.to_dict` is ``state.json`` (:mod:`impq_onnx.search.checkpoint`) less the plan and
  values, which each iteration's folder holds.
- :class:`IterationRecord`: one iteration's row, as ``metrics.json``, ``state.json`` and the report's
  ``iterations`` hold it; :meth:`IterationRecord.to_dict` gives the keys in the order the files have
  always had, so checkpoints and reports keep their bytes and older work directories still resume.

This module imports no strategy: every strategy and ``compress`` import it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from impq_onnx.errors import ConfigError, one_line
from impq_onnx.events import Progress, nested
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.search.checkpoint import WorkDir

if TYPE_CHECKING:
    from impq_onnx.data.dataset import Dataset
    from impq_onnx.frontend.canonical import CanonicalModel
    from impq_onnx.frontend.sites import SiteTable

__all__ = ["FINAL_KEYS", "PHASE_ORDERS", "IterationRecord", "SearchContext", "SearchState"]

PHASE_ORDERS: dict[str, tuple[str, ...]] = {
    "weights-activations": ("weights", "activations"),
    "activations-weights": ("activations", "weights"),
    "weights": ("weights",),
    "activations": ("activations",),
}
# The record keys the report's ``final`` block copies from the output iteration, in that order.
FINAL_KEYS = ("iteration", "weight_bits_effective", "activation_bits_effective", "gbitops", "compression_ratio",
              "weight_bytes", "model_bytes", "val_top1", "val_top5", "val_agreement")


@dataclasses.dataclass(frozen=True)
class SearchContext:
    """Everything a search run is fixed to (see the module docstring)."""

    config: Any  # the CompressConfig (typed loosely: compress is the layer above the search)
    base: CanonicalModel  # the float model; every iteration's model is base + fine-tuned values
    sites: SiteTable
    train: Dataset
    val: Dataset
    workdir: WorkDir
    reference: dict[str, Any]  # the float model on the validation split: top1, top5, n
    other_float_bytes: float = 0.0  # float parameters that are not quantized weights (model_bytes)
    progress: Progress | None = None  # events: one ``iteration`` per iteration, the inner activities nested
    cache: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)  # per-run values
    # computed on first use (:func:`impq_onnx.search.iteration.float_classes`)

    @property
    def phases(self) -> tuple[str, ...]:
        return PHASE_ORDERS[self.config.phases]

    def inner_progress(self, plain: bool = True) -> Progress | None:
        """Progress of an activity inside an iteration (fine-tune, sensitivity, evaluation): its plain lines
        indented under the iteration's, or (``plain`` False) kept off them."""
        return nested(self.progress, plain=plain)


@dataclasses.dataclass
class IterationRecord:
    """One iteration's row. ``extra`` holds a strategy's own fields (densities, learning rates, steps)."""

    iteration: int
    phase: str
    kind: str  # start / lower (IMPQ); fine-tune, density, calibrate (the baselines)
    lowered: int
    reducible: int | None
    weight_bits_effective: float
    activation_bits_effective: float
    compression_ratio: float
    weight_bytes: float
    gbitops: float
    model_bytes: float
    val_top1: float | None
    val_top5: float | None
    val_agreement: float | None
    val_n: int
    fine_tune_steps: int
    fine_tune_loss: float | None
    sensitivity_seconds: float
    fine_tune_seconds: float
    seconds: float
    elapsed: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    within_accuracy_drop: bool | None = None  # set by the stop decision
    phase_end: str | None = None  # why the phase ended (IMPQ); absent from the dict while None
    stop: str | None = None  # why the run ended; None while it goes on

    def to_dict(self) -> dict[str, Any]:
        """The record's JSON object: the fields in order, ``extra`` after ``elapsed``, then the decision."""
        data = {f.name: getattr(self, f.name) for f in _ROW_FIELDS}
        data.update(self.extra)
        data["within_accuracy_drop"] = self.within_accuracy_drop
        if self.phase_end is not None:
            data["phase_end"] = self.phase_end
        data["stop"] = self.stop
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IterationRecord:
        """The record of a JSON object :meth:`to_dict` wrote; unknown keys go to ``extra`` in their order.

        A ``KeyError`` names a missing field."""
        known = {f.name for f in dataclasses.fields(cls)}
        row = {f.name: data[f.name] for f in _ROW_FIELDS}
        for name, optional in _NUMBERS.items():  # the report and the stop rules compute with them
            value = row[name]
            if not (value is None and optional) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"iteration record field {name!r} is {str(value)[:40]!r}, not a number")
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**row, extra=extra, within_accuracy_drop=data.get("within_accuracy_drop"),
                   phase_end=data.get("phase_end"), stop=data.get("stop"))

    def final_metrics(self) -> dict[str, Any]:
        """The report's ``final`` block for this iteration (:data:`FINAL_KEYS`)."""
        return {key: getattr(self, key) for key in FINAL_KEYS}


_ROW_FIELDS = tuple(f for f in dataclasses.fields(IterationRecord)
                    if f.name not in ("extra", "within_accuracy_drop", "phase_end", "stop"))
# the numeric row fields, and whether each may be None (their annotations are text under __future__.annotations)
_NUMBERS = {f.name: str(f.type).endswith("| None") for f in _ROW_FIELDS
            if str(f.type).split(" | ")[0] in ("int", "float")}


@dataclasses.dataclass
class SearchState:
    """What a run's iterations change; ``iteration`` is the last committed one (-1: none yet)."""

    plan: PrecisionPlan
    values: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # fine-tuned float parameters
    iteration: int = -1
    phase: int = 0  # index into the phase order
    phase_started: bool = False
    phase_step: int = 0  # lowering steps done in the current phase
    elapsed: float = 0.0  # committed wall seconds
    last_good: int | None = None  # latest iteration within max_accuracy_drop
    final: int | None = None  # the iteration the outputs come from
    stop: str | None = None  # why the run ended; None while it goes on
    records: list[IterationRecord] = dataclasses.field(default_factory=list)

    def record(self, iteration: int) -> IterationRecord:
        return next(r for r in self.records if r.iteration == iteration)

    def to_dict(self, reference: dict[str, Any]) -> dict[str, Any]:
        """``state.json``'s content (without its version): the loop fields, ``reference`` and the records."""
        return {"iteration": self.iteration, "phase": self.phase, "phase_started": self.phase_started,
                "phase_step": self.phase_step, "elapsed": self.elapsed, "last_good": self.last_good,
                "final": self.final, "stop": self.stop, "reference": reference,
                "records": [r.to_dict() for r in self.records]}

    @classmethod
    def resume(cls, workdir: WorkDir) -> tuple[SearchState, dict[str, Any]]:
        """The committed state of ``workdir`` and the run's float reference metrics, for a resume."""
        data = workdir.load_state()
        try:  # a checkpoint file load_iteration cannot read is its own ConfigError, naming the file
            plan, values = workdir.load_iteration(int(data["iteration"]))
            return cls.from_dict(data, plan, values), data["reference"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"work_dir {workdir.path}: state.json is damaged ({type(exc).__name__}: "
                              f"{one_line(exc)}); cannot resume, start a new work_dir") from exc

    def commit(self, workdir: WorkDir, reference: dict[str, Any]) -> None:
        """Make this state the one a resume starts from (``state.json``, written last)."""
        workdir.commit(self.to_dict(reference))

    @classmethod
    def from_dict(cls, data: dict[str, Any], plan: PrecisionPlan, values: dict[str, np.ndarray]) -> SearchState:
        """The state ``state.json`` holds, with the committed iteration's ``plan`` and ``values``."""
        return cls(plan=plan, values=values, iteration=data["iteration"], phase=data["phase"],
                   phase_started=data["phase_started"], phase_step=data["phase_step"], elapsed=data["elapsed"],
                   last_good=data["last_good"], final=data["final"], stop=data["stop"],
                   records=[IterationRecord.from_dict(r) for r in data["records"]])

"""The typed Python API: ``load``, ``inspect``, ``evaluate``, ``sensitivity``, ``compress``, ``lower``,
``verify`` and ``report``, re-exported by :mod:`impq_onnx` (``impq_onnx.compress(...)``).

Each takes the model as a path, an in-memory ``onnx.ModelProto`` or a
:class:`~impq_onnx.frontend.canonical.CanonicalModel`, and data as a folder, an ``.npz``, numpy arrays
(``images`` or ``(images, labels)``), a ``{"train": ..., "val": ..., "test": ...}`` mapping of those, or any
iterable / callable of ``(images, labels?)`` batches (:mod:`impq_onnx.data.in_memory`). Results are
dataclasses. The library prints nothing and configures no logging: progress goes to a ``progress``
callback when one is given, log records to the ``impq_onnx`` loggers (a ``NullHandler`` by default), and
the root-logger handler that importing onnxruntime adds is removed. Bad input raises a
:class:`~impq_onnx.errors.UserError` subclass with a one-line message; inputs are never written. The
reference is ``docs/api.md``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

import numpy as np
import onnx

from impq_onnx.compression import CompressConfig, CompressResult
from impq_onnx.data.in_memory import InMemoryData
from impq_onnx.data.preprocess import Preprocess
from impq_onnx.engine.evaluation import EvalResult
from impq_onnx.errors import ConfigError, ModelError, PlatformError
from impq_onnx.frontend.canonical import CanonicalModel
from impq_onnx.frontend.sites import SiteTable
from impq_onnx.lowering.lower import LoweredModel
from impq_onnx.lowering.verify import VerifyResult
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.sensitivity.table import SensitivityTable

__all__ = ["load", "inspect", "evaluate", "sensitivity", "compress", "lower", "verify", "report",
           "InspectResult", "EvalResult", "SensitivityTable", "CompressResult", "CompressConfig", "LowerResult",
           "VerifyResult", "ReportResult", "ModelLike", "DataLike", "PlanLike", "Progress", "DEFAULT"]

PathLike = str | os.PathLike[str]
ModelLike = str | os.PathLike[str] | onnx.ModelProto | CanonicalModel
DataLike = (str | os.PathLike[str] | np.ndarray | tuple[np.ndarray, np.ndarray | None] | Mapping[str, Any]
            | Iterable[Any] | Callable[[], Iterable[Any]] | InMemoryData)
PlanLike = PrecisionPlan | str | os.PathLike[str]
Progress = Callable[[Any], None] | None  # receives progress events; None: silent

_P = ParamSpec("_P")
_R = TypeVar("_R")


class _Default(enum.Enum):
    DEFAULT = "default"

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default.DEFAULT  # "not given": the option's value from ``config``, else CompressConfig's default
Default = Literal[_Default.DEFAULT]


def _library_call(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Leave the root logger as the caller had it (onnxruntime and onnxruntime-training add handlers)."""

    @functools.wraps(func)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        from impq_onnx.runtime import root_logging_unchanged

        with root_logging_unchanged():
            return func(*args, **kwargs)

    return call


def _is_path(value: object) -> bool:
    return isinstance(value, (str, os.PathLike))


@_library_call
def load(model: ModelLike, *, logits: str | None = None, check_runtime: bool = True,
         output: str | None = None) -> CanonicalModel:
    """The canonical form of ``model`` (a path, never written, or an in-memory ``onnx.ModelProto``).

    ``logits`` names the logits tensor when the model has several outputs (``output`` is its former name,
    kept so that existing calls work); ``check_runtime`` proves with an onnxruntime session that every
    node runs.
    """
    from impq_onnx.frontend import canonical

    if output is not None:
        if logits is not None and logits != output:
            raise ConfigError(f"load: logits={logits!r} and output={output!r} name different tensors; give "
                              "logits only (output is its former name)")
        logits = output

    if isinstance(model, CanonicalModel):
        return model if logits is None else canonical.from_proto(model.to_proto(), logits, label=model.label,
                                                                 check_runtime=check_runtime)
    if isinstance(model, onnx.ModelProto):
        return canonical.from_proto(model, logits, check_runtime=check_runtime, label="<in-memory model>")
    if _is_path(model):
        return canonical.load(model, logits, check_runtime=check_runtime)
    raise ModelError(f"model: a {type(model).__name__} is not a model; give a path, an onnx.ModelProto or a "
                     "CanonicalModel")


def _label(model: ModelLike) -> str:
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    return model.label if isinstance(model, CanonicalModel) else "<in-memory model>"


def _data(model: CanonicalModel, data: DataLike, preprocess: str | Preprocess | None, **options: Any) -> Any:
    """``open_model_data`` for a path or any in-memory form."""
    from impq_onnx.data.in_memory import in_memory_data
    from impq_onnx.data.model_data import open_model_data

    source = data if _is_path(data) else in_memory_data(data)
    return open_model_data(model, source, preprocess, **options)  # type: ignore[arg-type]


def _plan(plan: PlanLike, sites: SiteTable) -> PrecisionPlan:
    if isinstance(plan, PrecisionPlan):
        return plan.validate(sites)
    if _is_path(plan):
        return PrecisionPlan.load_for(plan, sites)
    raise ConfigError(f"plan: a {type(plan).__name__} is not a plan; give a PrecisionPlan or a plan file path")


@dataclasses.dataclass(frozen=True)
class InspectResult:
    """The quantizable layers, weight groups and activation sites of a model."""

    model: str  # the path, or "<in-memory model>"
    sites: SiteTable

    def to_dict(self) -> dict[str, Any]:
        """What ``impq-onnx inspect --json`` prints."""
        from impq_onnx.frontend.inspection import inspection_dict

        return inspection_dict(self.sites, self.model)

    def table(self) -> str:
        """What ``impq-onnx inspect`` prints."""
        from impq_onnx.frontend.inspection import format_table

        return format_table(self.sites, self.model)


@_library_call
def inspect(model: ModelLike, *, input_shape: tuple[int, ...] | None = None,
            logits: str | None = None) -> InspectResult:
    """Find the quantizable layers and activation sites (``input_shape``: a concrete shape for MACs)."""
    from impq_onnx.frontend.site_analysis import find_sites

    return InspectResult(_label(model), find_sites(load(model, logits=logits), input_shape))


@_library_call
def evaluate(model: ModelLike, data: DataLike, *, plan: PlanLike | None = None,
             preprocess: str | Preprocess | None = None, batch_size: int = 100, limit_per_class: int | None = None,
             threads: int = 2, input_shape: tuple[int, ...] | None = None, logits: str | None = None,
             progress: Progress = None) -> EvalResult:
    """Top-1/top-5 accuracy of ``model`` (simulated under ``plan`` when given) on the test split of ``data``
    (the whole data when it has none), agreement with the float model, throughput."""
    from impq_onnx.engine import evaluate as run_evaluation
    from impq_onnx.frontend.site_analysis import find_sites
    from impq_onnx.option_checks import EVALUATE, check_numbers

    check_numbers(dict(batch_size=batch_size, limit_per_class=limit_per_class, threads=threads), EVALUATE)
    canonical = load(model, logits=logits)
    dataset = _data(canonical, data, preprocess, limit_per_class=limit_per_class).evaluation
    checked = sites = None
    if plan is not None:
        sites = find_sites(canonical, input_shape or (1, *dataset.sample_shape))
        checked = _plan(plan, sites)
    return run_evaluation(canonical, dataset.batches(batch_size), plan=checked, sites=sites,
                          float_model=canonical if checked is not None else None, threads=threads,
                          progress=progress if progress is not None else False)


@_library_call
def sensitivity(model: ModelLike, data: DataLike, *, plan: PlanLike | None = None, samples: int = 256,
                granularity: Literal["kernel", "layer", "network"] = "kernel", runner_ups: int = 10,
                weighting: Literal["paper", "reference", "step", "measured"] = "paper",
                method: Literal["fast", "exact"] = "fast", preprocess: str | Preprocess | None = None,
                seed: int = 0, threads: int = 2, input_shape: tuple[int, ...] | None = None,
                logits: str | None = None) -> SensitivityTable:
    """Noise-gain sensitivity ``M`` of every weight group and activation site (IMPQ eq. 4-5), measured on a
    seeded random subset of ``samples`` images of the training part of ``data``."""
    from impq_onnx.frontend.site_analysis import find_sites
    from impq_onnx.option_checks import SENSITIVITY, check_numbers
    from impq_onnx.quant.simulate import simulate
    from impq_onnx.sensitivity import METHODS, WEIGHTINGS, noise_gain

    check_numbers(dict(samples=samples, runner_ups=runner_ups, seed=seed, threads=threads), SENSITIVITY)
    for name, value, choices in (("granularity", granularity, ("kernel", "layer", "network")),
                                 ("weighting", weighting, WEIGHTINGS), ("method", method, METHODS)):
        if value not in choices:
            raise ConfigError(f"option '{name}': {value!r} is not one of {', '.join(choices)}")
    canonical = load(model, logits=logits)
    dataset = _data(canonical, data, preprocess).train_all
    sites = find_sites(canonical, input_shape or (1, *dataset.sample_shape))
    checked = _plan(plan, sites) if plan is not None else None
    if samples < len(dataset):  # a seeded, class-blind random subset of exactly `samples` images (as the CLI)
        dataset = dataset.subset(np.sort(np.random.default_rng(seed).choice(len(dataset), samples, replace=False)))
    measured = simulate(canonical, checked, sites) if checked is not None else canonical
    return noise_gain(measured, sites, dataset.batches(64), plan=checked, granularity=granularity,
                      runner_ups=runner_ups, weighting=weighting, method=method, samples=samples, seed=seed,
                      threads=threads)


@_library_call
def compress(
    model: ModelLike | None = None,
    data: DataLike | None = None,
    *,
    output: PathLike | None = None,
    config: CompressConfig | PathLike | None = None,
    progress: Progress = None,
    work_dir: PathLike | None = None,
    method: str | Default = DEFAULT,
    report: bool | Default = DEFAULT,
    format: str | Default = DEFAULT,
    resume: bool | Default = DEFAULT,
    preprocess: str | None | Default = DEFAULT,
    classes: str | None | Default = DEFAULT,
    input_shape: str | None | Default = DEFAULT,
    logits: str | None | Default = DEFAULT,
    val_fraction: float | Default = DEFAULT,
    max_val_samples: int | None | Default = DEFAULT,
    phases: str | Default = DEFAULT,
    granularity: str | Default = DEFAULT,
    weight_scheme: str | None | Default = DEFAULT,
    start_bits: int | Default = DEFAULT,
    start_act_bits: int | Default = DEFAULT,
    keep_ends: int | Default = DEFAULT,
    act_clip: str | None | Default = DEFAULT,
    schedule: str | Default = DEFAULT,
    act_schedule: str | Default = DEFAULT,
    target_bits: float | None | Default = DEFAULT,
    target_act_bits: float | None | Default = DEFAULT,
    land_on_target: bool | Default = DEFAULT,
    target_gbitops: float | None | Default = DEFAULT,
    max_accuracy_drop: float | None | Default = DEFAULT,
    max_iterations: int | Default = DEFAULT,
    steps: int | Default = DEFAULT,
    epochs: float | None | Default = DEFAULT,
    start_steps: int | None | Default = DEFAULT,
    end_steps_factor: float | None | Default = DEFAULT,
    refit_epochs: float | Default = DEFAULT,
    refit_average_epochs: int | Default = DEFAULT,
    refit_lr: float | None | Default = DEFAULT,
    time_budget: float | None | Default = DEFAULT,
    batch_size: int | Default = DEFAULT,
    lr: float | None | Default = DEFAULT,
    optimizer: str | Default = DEFAULT,
    momentum: float | Default = DEFAULT,
    batchnorm: str | None | Default = DEFAULT,
    weight_decay: float | Default = DEFAULT,
    augment: bool | Default = DEFAULT,
    distill: bool | Default = DEFAULT,
    guard: bool | Default = DEFAULT,
    sensitivity_samples: int | Default = DEFAULT,
    runner_ups: int | Default = DEFAULT,
    weighting: str | None | Default = DEFAULT,
    sensitivity_method: str | Default = DEFAULT,
    seed: int | Default = DEFAULT,
    threads: int | None | Default = DEFAULT,
    replicas: int | None | Default = DEFAULT,
) -> CompressResult:
    """IMPQ mixed-precision search (or ``method``) from the float ``model`` on ``data``; writes ``output``
    (required for an in-memory model), ``<stem>.plan.yaml``, ``<stem>.report.json``, ``<stem>.config.yaml``,
    ``<stem>.float.onnx`` and, with matplotlib installed, ``<stem>.report.html``, all or nothing.

    Every keyword is a :class:`~impq_onnx.compression.CompressConfig` field of the same name (see its help
    texts, or ``docs/api.md``); one not given (:data:`DEFAULT`) takes its value from ``config`` (a
    CompressConfig or a YAML file), else the CompressConfig default. ``progress`` receives progress events
    (None: silent). An in-memory model or data is never written; the outputs record them by SHA-256.
    """
    given = {name: value for name, value in locals().items()
             if name in _COMPRESS_OPTIONS and value is not DEFAULT}
    for key in ("output", "work_dir"):  # None: the default path
        if given.get(key) is None:
            given.pop(key, None)
        else:
            given[key] = os.fspath(given[key])
    yaml_config: PathLike | None = None
    if isinstance(config, CompressConfig):
        base = {f.name: getattr(config, f.name) for f in dataclasses.fields(CompressConfig)}
        model = model if model is not None else base.pop("model")
        data = data if data is not None else base.pop("data")
        given = {**{k: v for k, v in base.items() if k not in ("model", "data")}, **given}
    elif config is not None:
        yaml_config = config
    # None given here means None (no target, say), where CompressConfig.resolve reads None as "not given".
    given = {key: "none" if value is None and key not in ("output", "work_dir") else value
             for key, value in given.items()}
    from impq_onnx.compression import compress as run_compress

    return run_compress(os.fspath(model) if _is_path(model) else model,  # type: ignore[arg-type]
                        os.fspath(data) if _is_path(data) else data,  # type: ignore[arg-type]
                        config=yaml_config, progress=progress if progress is not None else False, **given)


_COMPRESS_OPTIONS = frozenset(f.name for f in dataclasses.fields(CompressConfig)) - {"model", "data"}


@dataclasses.dataclass(frozen=True)
class LowerResult:
    """A lowered model: the ONNX model, its bit-width sidecar, the target's attachments, the files written."""

    model: onnx.ModelProto
    sidecar: dict[str, Any]
    format: str
    attachments: dict[str, Any]
    paths: list[Path]  # the files written (the model first); empty when no ``output`` was given

    @property
    def lowered(self) -> LoweredModel:
        return LoweredModel(self.model, self.sidecar, self.format, dict(self.attachments))


@_library_call
def lower(model: ModelLike, plan: PlanLike, *, output: PathLike | None = None, format: str = "qdq",
          input_shape: tuple[int, ...] | None = None, logits: str | None = None,
          encodings_version: Literal["0.6.1", "1.0.0", "2.0.0"] = "0.6.1",
          static_batch: int | None = None) -> LowerResult:
    """``model`` quantized under ``plan`` in ``format`` (qdq, qonnx, encodings, ...); written to ``output``
    (and ``<output>.bits.json``, all or nothing) when given."""
    from impq_onnx.frontend.model_file import model_inputs
    from impq_onnx.frontend.passes.dynamic_batch import restore_declared_batch
    from impq_onnx.frontend.site_analysis import find_sites
    from impq_onnx.lowering import lower as run_lower
    from impq_onnx.lowering.lower import derived_paths, output_files
    from impq_onnx.lowering.targets import TARGETS
    from impq_onnx.outputs import OutputSet, check_paths

    if format not in TARGETS:
        raise ConfigError(f"option 'format': {format!r} is not one of {', '.join(TARGETS)}")
    if static_batch is not None and static_batch < 1:
        raise ConfigError(f"option 'static_batch': {static_batch} must be at least 1")
    paths: list[Path] = []
    outputs = None
    if output is not None:
        target = Path(output)
        derived = derived_paths(target, format)
        check_paths([("output", target)] + [("the derived output", p) for p in derived],
                    {**(model_inputs(model) if _is_path(model) else {}),  # type: ignore[arg-type]
                     "the plan": Path(plan) if _is_path(plan) else None},  # type: ignore[arg-type]
                    flag="output=")
        outputs = OutputSet([target, *derived], locked=[target])
    canonical = load(model, logits=logits)
    sites = find_sites(canonical, input_shape)
    lowered = run_lower(canonical, _plan(plan, sites), sites, format=format, encodings_version=encodings_version,
                        static_batch=static_batch)
    lowered.proto = restore_declared_batch(lowered.proto, canonical.declared_batch)
    if outputs is not None:
        with outputs:
            paths = outputs.commit(output_files(lowered, Path(output)))  # type: ignore[arg-type]
    return LowerResult(lowered.proto, lowered.sidecar, lowered.format, dict(lowered.attachments), paths)


@_library_call
def verify(lowered: LowerResult | LoweredModel | PathLike, model: ModelLike, plan: PlanLike, data: DataLike, *,
           preprocess: str | Preprocess | None = None, limit_per_class: int | None = None, threads: int = 2,
           logit_tolerance: float = 0.0, input_shape: tuple[int, ...] | None = None,
           logits: str | None = None) -> VerifyResult:
    """Check ``lowered`` against ``model`` under ``plan``: every code, scale and zero point, the predictions on
    ``data`` (its test split, else all of it), ranges and annotations. ``result.ok`` says whether all agree."""
    from impq_onnx.frontend.site_analysis import find_sites
    from impq_onnx.lowering.lower import read_lowered
    from impq_onnx.lowering.verify import verify as run_verify
    from impq_onnx.option_checks import VERIFY, check_numbers

    check_numbers(dict(limit_per_class=limit_per_class, threads=threads, logit_tolerance=logit_tolerance), VERIFY)
    if isinstance(lowered, LowerResult):
        checked_model = lowered.lowered
    elif isinstance(lowered, LoweredModel):
        checked_model = lowered
    else:
        checked_model = read_lowered(lowered)
    canonical = load(model, logits=logits)
    dataset = _data(canonical, data, preprocess, limit_per_class=limit_per_class).evaluation
    sites = find_sites(canonical, input_shape or (1, *dataset.sample_shape))
    return run_verify(checked_model, canonical, _plan(plan, sites), sites, dataset.batches(100), threads=threads,
                      logit_tolerance=logit_tolerance)


@dataclasses.dataclass(frozen=True)
class ReportResult:
    """The files :func:`report` wrote: the HTML page and its PNG figures."""

    html: Path
    figures: list[Path]


@_library_call
def report(work_dirs: PathLike | Iterable[PathLike], output: PathLike) -> ReportResult:
    """The HTML report of the compress runs in ``work_dirs`` (one or several), written to ``output`` (``.html``)
    with its figures beside it. Needs the ``report`` extra (matplotlib)."""
    from impq_onnx.compression import report_available

    if not report_available():
        raise PlatformError("report needs matplotlib: pip install 'impq-onnx[report]'")
    from impq_onnx.report import write_report

    written = write_report(work_dirs, output)
    return ReportResult(written[0], written[1:])

"""``compress``: IMPQ mixed-precision search from a float ONNX classifier to a quantized one.

``impq_onnx.compress(model="m.onnx", data="images/", target_bits=5)`` and ``impq-onnx compress
m.onnx --data images/ --target-bits 5`` take the same options (:class:`CompressConfig`); a YAML
``config`` file maps 1:1 onto them, and explicit arguments override it. The loop itself is
:mod:`impq_onnx.search.impq`; ``method`` picks it or a baseline strategy over the same plan, engine
and outputs (:mod:`impq_onnx.search.methods`: faq, activation-density, uniform-ptq); this module
resolves options, data and outputs.

Outputs (checked against the inputs before any work, locked, staged beside the target and renamed
into place together at the end, so an error or a signal leaves none; :mod:`impq_onnx.outputs`):
``output`` (the model), ``<stem>.plan.yaml``, ``<stem>.report.json`` (every iteration and the final
metrics) and ``<stem>.config.yaml`` (the resolved options; ``--config`` it to reproduce the run).
The work directory (default ``<stem>.work``) holds a checkpoint per iteration; ``resume`` continues
a killed run there and gives the same final bytes as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml

from impq_onnx.compress_config import CompressConfig
from impq_onnx.errors import ConfigError
from impq_onnx.events import Event, Progress, progress_callback
from impq_onnx.lowering.lower import derived_paths, output_files
from impq_onnx.outputs import OutputSet, check_paths, input_file
from impq_onnx.search.iteration import known_float_classes
from impq_onnx.search.methods import METHODS
from impq_onnx.search.state import IterationRecord

__all__ = ["CompressConfig", "CompressResult", "compress", "export_model", "report_available", "target_reached"]

# Options that do not change what the search computes: a resume may change them. refit_epochs,
# refit_average_epochs and refit_lr change only what follows the search, and the refit checks its own settings
# (impq_onnx.search.refit).
_NOT_IDENTITY = ("resume", "output", "work_dir", "config", "format", "report", "refit_epochs",
                 "refit_average_epochs", "refit_lr")
# Options added after work dirs were written, with the value that computes what the version without them
# did: such a work dir resumes when the option has that value (--batchnorm train, --no-guard).
_LEGACY = {"batchnorm": "train", "guard": False, "lr": 0.005, "end_steps_factor": 1.0, "act_clip": "paper",
           "weighting": "paper", "weight_scheme": "midrise-max", "keep_ends": 0, "logits": None}


@dataclasses.dataclass
class CompressResult:
    plan: Any  # PrecisionPlan of the output model
    final: dict  # metrics of the output model (validation, and test when there is a test split)
    iterations: list[IterationRecord]  # one record per iteration
    reference: dict  # the float model's metrics
    stop_reason: str
    paths: dict[str, Path]
    config: CompressConfig

    @property
    def target_reached(self) -> bool:
        """Whether the output meets the run's targets (:func:`target_reached`); the CLI exits 4 when not."""
        return target_reached(self.config, self.stop_reason, self.final)


def target_reached(cfg: CompressConfig, stop: str | None, final: dict) -> bool:
    """Whether a run that stopped for ``stop`` with output metrics ``final`` met its targets.

    A run cut short by ``time_budget`` or ``max_accuracy_drop`` did not. For IMPQ the output must also be at
    or below ``target_bits`` (weight phase), ``target_act_bits`` (activation phase) and ``target_gbitops``,
    each when set: a phase that ended at ``max_iterations`` or with every group at 1 bit above its target
    did not reach it. The baselines pick their bits from the targets (rounded) and are judged on ``stop``.
    """
    if stop in ("time_budget", "max_accuracy_drop"):
        return False
    if cfg.method != "impq":
        return True
    phases = cfg.phases.split("-")
    checks = [("weights" in phases, cfg.target_bits, final.get("weight_bits_effective")),
              ("activations" in phases, cfg.target_act_bits, final.get("activation_bits_effective")),
              (True, cfg.target_gbitops, final.get("gbitops"))]
    return all(value is not None and value <= target + 1e-9 for used, target, value in checks
               if used and target is not None)


def export_model(model, plan, sites, format: str = "qdq"):
    """The deployable model: ``model`` (fine-tuned float) lowered under ``plan`` (a LoweredModel)."""
    from impq_onnx.lowering.lower import lower

    return lower(model, plan, sites, format=format)


def _verified(lowered, model, plan, sites, dataset) -> dict:
    """verify() on the evaluation images; a failure is a bug, reported instead of writing outputs (exit 3)."""
    from impq_onnx.errors import VerificationError
    from impq_onnx.search.impq import EVAL_BATCH, labelled_batches
    from impq_onnx.lowering.verify import verify

    result = verify(lowered, model, plan, sites, labelled_batches(dataset, EVAL_BATCH))
    if not result.ok:
        problems = [result.checker_error] if result.checker_error else []
        problems += result.range_violations + result.record_mismatches
        raise VerificationError(f"the lowered model failed verification ({result.agreement:.4f} agreement, max logit "
                            f"difference {result.max_logit_diff:.3g}{'; ' + problems[0] if problems else ''}); "
                            "include the plan")
    return result.to_dict()


def _calibration_only_check(cfg: CompressConfig, base, plan, sites, val, final: dict) -> tuple[dict | None, list]:
    """The output plan on the input float weights (calibration only: no fine-tune) on the validation split,
    and the warning lines when the written model validates below it in agreement with the float model.
    None for uniform-ptq, which does not fine-tune."""
    if cfg.method == "uniform-ptq":
        return None, []
    from impq_onnx.engine import evaluate
    from impq_onnx.search.iteration import EVAL_BATCH, labelled_batches

    result = evaluate(base, labelled_batches(val, EVAL_BATCH), plan=plan, sites=sites, float_model=base,
                      threads=cfg.threads)
    reference = {"val_top1": result.top1, "val_agreement": result.agreement, "val_n": result.n}
    warnings = []
    ours = final.get("val_agreement")
    if ours is not None and result.agreement is not None and ours < result.agreement:
        warnings.append(f"the written model validates below the same plan without fine-tuning: agreement with the "
                        f"float model {100 * ours:.1f}% vs {100 * result.agreement:.1f}% calibration only "
                        f"(iteration {final['iteration']}; report key calibration_only)")
        logging.getLogger(__name__).warning(warnings[-1])
    return reference, warnings


def _other_float_bytes(canonical, sites) -> float:
    quantized = {layer.weight for layer in sites.layers}
    return 4.0 * sum(int(np.prod(t.dims)) for t in canonical.to_proto().graph.initializer
                     if t.name not in quantized and t.data_type == onnx.TensorProto.FLOAT)


def final_summary(final: dict, reference: dict) -> str:
    """The last line's figures: bits, cost, and top-1 beside the float model's with the drop, and the
    agreement with the float model (on test/ when there is one, else on the validation split)."""
    split = "test" if "test_top1" in final else "val"
    top1, agreement = final.get(f"{split}_top1"), final.get(f"{split}_agreement")
    base = reference.get("test_top1" if split == "test" else "top1")
    text = (f"iteration {final['iteration']}, B_w,eff {final['weight_bits_effective']:.3f}, B_a,eff "
            f"{final['activation_bits_effective']:.3f}, {final['gbitops']:.4g} Gbit-OPs, {split} top-1 ")
    if top1 is None:
        text += "n/a (no labels)"
    else:
        text += f"{100 * top1:.1f}%"
        if base is not None:
            text += f" (float {100 * base:.1f}%, drop {100 * (base - top1):.1f} points)"
    if agreement is not None:
        text += f", agreement with float {100 * agreement:.1f}%"
    return text


def _metrics(result, prefix: str) -> dict:
    return {f"{prefix}_top1": result.top1, f"{prefix}_top5": result.top5, f"{prefix}_agreement": result.agreement,
            f"{prefix}_n": result.n}


@dataclasses.dataclass(frozen=True)
class _Sources:
    """What the caller passed in memory (None: read ``cfg.model`` / ``cfg.data`` from their paths)."""

    model: Any = None  # an onnx.ModelProto or a CanonicalModel
    data: Any = None  # an impq_onnx.data.in_memory.InMemoryData


def _in_memory(model: Any, data: Any) -> tuple[dict[str, str | None], _Sources]:
    """The ``model`` / ``data`` options as recorded (paths, or labels naming in-memory objects by digest)."""
    given: dict[str, str | None] = {"model": None if model is None else os.fsdecode(model)
                                    if isinstance(model, (str, os.PathLike)) else None,
                                    "data": None if data is None else os.fsdecode(data)
                                    if isinstance(data, (str, os.PathLike)) else None}
    sources = _Sources()
    if model is not None and given["model"] is None:
        proto = model if isinstance(model, onnx.ModelProto) else model.to_proto()
        digest = hashlib.sha256(proto.SerializeToString()).hexdigest()
        given["model"] = f"<in-memory model, sha256 {digest[:16]}>"
        sources = dataclasses.replace(sources, model=model)
    if data is not None and given["data"] is None:
        from impq_onnx.data.in_memory import in_memory_data

        data = in_memory_data(data)
        given["data"] = data.label
        sources = dataclasses.replace(sources, data=data)
    return given, sources


def compress(model: Any = None, data: Any = None, *,
             config: str | os.PathLike | None = None, progress: bool | Progress = True,
             **options: Any) -> CompressResult:
    """Run IMPQ (or ``method``) on ``model`` with ``data``; see :class:`CompressConfig` for every option.

    ``model``: a path, an ``onnx.ModelProto`` or a CanonicalModel (in memory: ``output`` is then required).
    ``data``: a path, or any in-memory form of :mod:`impq_onnx.data.in_memory`. The typed entry point is
    :func:`impq_onnx.api.compress`.
    """
    from impq_onnx.option_checks import target_warnings

    given, sources = _in_memory(model, data)
    if sources.model is not None and options.get("output") is None:
        raise ConfigError("compress of an in-memory model needs output=: the path of the model to write")
    cfg = CompressConfig.resolve(config, **given, **options)
    if cfg.method != "uniform-ptq":  # before any work: a plain onnxruntime shadowing the training build
        from impq_onnx.engine.ort_training import require_training_runtime

        require_training_runtime()
    for line in target_warnings(cfg):
        logging.getLogger(__name__).warning(line)
    if cfg.report and not report_available():
        logging.getLogger(__name__).warning("no HTML report: matplotlib is not installed (pip install "
                                            "'impq-onnx[report]'); the model, plan and report.json are written")
        cfg = dataclasses.replace(cfg, report=False)
    paths = cfg.paths()
    from impq_onnx.runtime import root_logging_unchanged

    # root_logging_unchanged: a library configures no logging (onnxruntime-training's logging.info would)
    with root_logging_unchanged(), _outputs(cfg, paths, config, sources) as outputs:  # checked, locked, staged
        return _compress(cfg, paths, outputs, progress, sources)


def _compress(cfg: CompressConfig, paths: dict[str, Path], outputs: OutputSet,
              progress: bool | Progress, sources: _Sources = _Sources()) -> CompressResult:
    from impq_onnx.data.model_data import open_model_data
    from impq_onnx.engine import evaluate
    from impq_onnx.frontend.canonical import load_with_digest
    from impq_onnx.search.checkpoint import WorkDir
    from impq_onnx.search.iteration import EVAL_BATCH, labelled_batches, with_values
    from impq_onnx.search.state import SearchContext, SearchState
    from impq_onnx.frontend.site_analysis import find_sites
    from impq_onnx.report.environment import run_environment
    from impq_onnx import option_checks

    report = progress_callback(progress)
    cfg = dataclasses.replace(cfg, output=str(paths["output"]), work_dir=str(paths["work_dir"]))
    if sources.model is None:
        base, digest = load_with_digest(cfg.model, output=cfg.logits)
    elif isinstance(sources.model, onnx.ModelProto):
        from impq_onnx.frontend.canonical import from_proto

        digest = hashlib.sha256(sources.model.SerializeToString()).hexdigest()
        base = from_proto(sources.model, output=cfg.logits, label=cfg.model)
    else:
        digest = hashlib.sha256(sources.model.to_bytes()).hexdigest()
        base = sources.model
        if cfg.logits is not None and cfg.logits != base.logits:
            raise ConfigError(f"option 'logits': the canonical model given already has its logits "
                              f"('{base.logits}'); pass the model file or ModelProto to choose another output")
    data = sources.data if sources.data is not None else cfg.data
    # Every image decoded once, into <work dir>/decoded (memory-mapped, reused by a resume; impq_onnx.data.cache).
    model_data = open_model_data(base, data, cfg.preprocess, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                 max_val_samples=cfg.max_val_samples, classes=cfg.classes,
                                 input_shape=option_checks.parse_shape(cfg.input_shape),
                                 cache_dir=paths["work_dir"] / "decoded")
    train, val, test = model_data.train, model_data.val, model_data.test  # opened and checked before any work
    if cfg.method != "uniform-ptq":  # every other method fine-tunes or measures gradients: refuse now, not mid-run
        from impq_onnx.engine.differentiable import check_trainable

        check_trainable(base, input_shape=(1, *model_data.preprocess.sample_shape))  # at the data's image size
    sites = find_sites(base, (1, *model_data.preprocess.sample_shape))
    workdir = WorkDir(paths["work_dir"])
    identity = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IDENTITY}
    identity["model_sha256"] = digest
    resuming = cfg.resume and workdir.has_state()
    if resuming:
        # A work dir of a version before a default became derived resumes with the value it ran with.
        cfg = dataclasses.replace(cfg, **workdir.check_identity(identity, _LEGACY))
    # Not given and not taken from an old work dir: the current default (recorded in config.yaml and report.json;
    # the work dir's identity keeps "not given").
    cfg = cfg.with_derived_defaults()
    if resuming:
        state, reference_metrics = SearchState.resume(workdir)
        moved = workdir.machine_change()
        if moved:
            logging.getLogger(__name__).warning(moved)
        seen_classes = None
        if report:
            report(Event("message", "compress", f"resuming {workdir.path} after iteration {state.iteration}",
                         data={"resumed_after": state.iteration}))
    else:
        workdir.start(identity)
        from impq_onnx.quant.plan import PrecisionPlan

        reference = evaluate(base, labelled_batches(val, EVAL_BATCH), threads=cfg.threads, keep_classes=True)
        seen_classes = reference.classes  # the search's agreement figures compare with these (float_classes)
        reference_metrics = {"top1": reference.top1, "top5": reference.top5, "n": reference.n}
        state = SearchState(PrecisionPlan.uniform(sites, None, None, weight_scheme=cfg.weight_scheme,
                                                  granularity=cfg.granularity))
        if report:
            top1 = "n/a" if reference.top1 is None else f"{100 * reference.top1:.1f}%"
            groups = len(sites.weight_groups(cfg.granularity))
            report(Event("message", "compress", f"float model: validation top-1 {top1}, {len(train)} training / "
                         f"{len(val)} validation images; {groups} weight groups, {len(sites.activations)} "
                         "activation sites",
                         data={"float_top1": reference.top1, "train_images": len(train), "val_images": len(val),
                               "weight_groups": groups, "activation_sites": len(sites.activations)}))
    context = SearchContext(cfg, base, sites, train, val, workdir, reference_metrics,
                            other_float_bytes=_other_float_bytes(base, sites), progress=report)
    if seen_classes is not None:
        known_float_classes(context, seen_classes)
    state = METHODS[cfg.method](context, state)

    derived = next((r.extra["lr_derived"] for r in state.records if "lr_derived" in r.extra), None)
    if cfg.lr is None and derived is not None:
        # The derived rate is what config.yaml and the report record: a --config rerun computes the same.
        cfg = dataclasses.replace(cfg, lr=float(derived["lr"]))
    plan, values = workdir.load_iteration(state.final)
    final = state.record(state.final).final_metrics()
    from impq_onnx.search.iteration import FIXED_LR
    from impq_onnx.search.refit import refit

    run_lr = cfg.lr if cfg.lr is not None else FIXED_LR
    refitted = refit(context, state, plan, cfg.refit_lr if cfg.refit_lr is not None else run_lr)
    if refitted is not None and refitted.kept:
        values, plan = refitted.values, refitted.plan
        final.update({key: refitted.record[key] for key in ("val_top1", "val_top5", "val_agreement")})
    final_model = with_values(base, values)
    final["elapsed"] = state.elapsed
    reference = dict(reference_metrics)
    if test is not None:
        final.update(_metrics(evaluate(final_model, labelled_batches(test, EVAL_BATCH), plan=plan, sites=sites,
                                       float_model=base, threads=cfg.threads), "test"))
        reference.update(_metrics(evaluate(base, labelled_batches(test, EVAL_BATCH), threads=cfg.threads), "test"))
    calibration_only, warnings = _calibration_only_check(cfg, base, plan, sites, val, final)
    lowered = export_model(final_model, plan, sites, cfg.format)
    verification = _verified(lowered, final_model, plan, sites, test if test is not None else val)
    # Verified at batch N on the logits, written with the original's interface (batch, names, dtypes, outputs).
    lowered.proto = base.with_interface(lowered.proto)
    document = {"model": cfg.model, "data": cfg.data, "method": cfg.method, "stop_reason": state.stop,
                "reference": reference, "final": final, "verification": verification,
                "calibration_only": calibration_only, "warnings": warnings,
                "learning_rate": {"lr": cfg.lr, "derived": derived},
                "refit": None if refitted is None else refitted.record,
                "iterations": [r.to_dict() for r in state.records],
                "config": cfg.to_dict(), "environment": run_environment()}
    report_json = (json.dumps(document, indent=1, allow_nan=True) + "\n").encode()
    files = {
        **output_files(lowered, paths["output"]),
        paths["float"]: final_model.to_bytes(),
        paths["plan"]: plan.to_yaml().encode(),
        paths["report"]: report_json,
        paths["config"]: yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode(),
    }
    if cfg.report:  # the HTML report reads <stem>.report.json, handed over before it is written
        from impq_onnx.report import report_files

        files.update(report_files([paths["work_dir"]], paths["report_html"],
                                  {paths["work_dir"]: (paths["report"], json.loads(report_json))}))
    outputs.commit(files)
    if report:
        report(Event("done", "compress", f"done ({state.stop}): {final_summary(final, reference)} -> {paths['output']}",
                     data={"stop_reason": state.stop, "target_reached": target_reached(cfg, state.stop, final),
                           "output": str(paths["output"]), **final}))
    return CompressResult(plan, final, state.records, reference, state.stop, paths, cfg)


def report_available() -> bool:
    """True when the plotting dependency of the HTML report (the ``report`` extra: matplotlib) is installed."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _outputs(cfg: CompressConfig, paths: dict[str, Path], config: str | os.PathLike | None,
             sources: _Sources = _Sources()) -> OutputSet:
    """Every file the run writes, checked against every input (:func:`check_paths`), as a locked OutputSet."""
    output = paths["output"]
    derived = derived_paths(output, cfg.format) + [paths["float"], paths["plan"], paths["report"], paths["config"]]
    if cfg.report:
        from impq_onnx.report.figures import FIGURES

        derived += [paths["report_html"]] + [Path(f"{paths['report_html'].with_suffix('')}.{name}.png")
                                             for name in FIGURES]
    from impq_onnx.frontend.model_file import model_inputs

    data = Path(cfg.data) if sources.data is None else None
    check_paths([("--output", output)] + [("the derived output", p) for p in derived],
                {**(model_inputs(cfg.model) if sources.model is None else {}),
                 "the config file": input_file(config),
                 "the preprocess file": input_file(cfg.preprocess),
                 "the data file": data if data is not None and data.is_file() else None,
                 "the classes file": input_file(cfg.classes)},
                trees={"the data folder": data if data is not None and data.is_dir() else None},
                work_dir=paths["work_dir"])
    return OutputSet([output, *derived], locked=[output, paths["work_dir"]])

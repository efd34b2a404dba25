"""What a report shows of one compress run, read from its work directory (never written).

Sources (layout in :mod:`impq_onnx.search.checkpoint`): ``run.json`` (the options that define the
run), ``state.json`` (every iteration's record, the float reference, the final iteration, why it
stopped), ``iterations/NNNN/plan.yaml`` (the bits), ``iterations/NNNN/sensitivity.json`` when the
loop recorded one, and ``<stem>.report.json`` beside the folder when compress finished (test-split
metrics, verification, the resolved config). The input model named in ``run.json`` is read, when it
is still there, only to put layers in network order, to pair each layer with its input activation
and to give each layer's op type and weights per kernel; without it layers are sorted by name and
the per-layer table shows no op or parameter counts. ``report.json``'s ``environment`` (versions and
command line) is shown when compress recorded it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

from impq_onnx.errors import ImpqError, UserError, one_line
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.search.state import IterationRecord

__all__ = ["RunData", "read_run"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LayerBits:
    """The bits of one quantized layer in the final plan (``None`` entries: kept float)."""

    node: str
    kernel_bits: tuple[int | None, ...]
    activation: str | None  # the input activation tensor, when the model told us
    activation_bits: int | None
    op_type: str | None = None  # from the model, when it is readable
    kernel_params: int | None = None  # weights per kernel, from the model


@dataclasses.dataclass(frozen=True)
class RunData:
    """One compress run as the report needs it: plain data, no open files."""

    path: Path
    label: str
    granularity: str
    records: tuple[IterationRecord, ...]
    reference: dict
    final: dict
    stop_reason: str | None  # None: the run has not finished (the last committed iteration is shown)
    config: dict
    verification: dict | None
    plan: PrecisionPlan
    layers: tuple[LayerBits, ...]  # network order when the model was readable, else by name
    unpaired_activations: tuple[tuple[str, int | None], ...]  # sites not paired with a layer
    sensitivity: dict | None  # SensitivityTable.to_dict() of the last iteration that recorded one
    sensitivity_iteration: int | None
    report_path: Path | None
    environment: dict | None = None  # versions and command line of the compress run (its report.json)
    refit: dict | None = None  # the report's refit block (compress --refit-epochs; impq_onnx.search.refit)


def _read_json(path: Path, what: str) -> dict:
    from impq_onnx.files import MiB, read_input

    try:  # never blocks on a FIFO put in place of the file, never reads a device
        document = json.loads(read_input(path, 1024 * MiB, what, UserError))
    except ValueError as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc})") from exc
    if not isinstance(document, dict):
        raise UserError(f"{path}: the {what} holds a {type(document).__name__}, not a JSON object (damaged?)")
    return document


def _not_a_work_dir(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a compress work dir ({why}); give the folder compress checkpoints into "
                     "(<output stem>.work by default)")


def _report_beside(path: Path, records: tuple[IterationRecord, ...]) -> Path | None:
    """``<stem>.report.json`` of the run that used ``path`` as its work dir, if compress wrote one.

    Its ``config.work_dir`` may be relative to wherever compress ran, so a report in the same folder
    is taken when that names this folder (resolved here, or by name) and its iterations are this
    work dir's records.
    """
    candidates = []
    if path.name.endswith(".work"):
        candidates.append(path.with_name(path.name.removesuffix(".work") + ".report.json"))
    candidates += sorted(p for p in path.parent.glob("*.report.json") if p not in candidates)
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            document = _read_json(candidate, "compress report")
        except UserError:  # _read_json's one error, unreadable and malformed alike
            continue
        try:  # a stray or foreign report beside the work dir is not this run's, never an error
            work_dir = (document.get("config") or {}).get("work_dir")
            if work_dir is None or not (_same_folder(Path(work_dir), path) or Path(work_dir).name == path.name):
                continue
            if tuple(IterationRecord.from_dict(r) for r in document.get("iterations") or ()) == records:
                return candidate
        except (KeyError, TypeError, ValueError, AttributeError):  # not a report of this version: not the one
            continue
    return None


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _network_order(model_path: str | None, plan: PrecisionPlan,
                   logits: str | None = None) -> list[tuple[str, str, str, int]] | None:
    """``(layer node, input activation tensor, op type, weights per kernel)`` in network order, or None
    when the model is not usable."""
    if not model_path or not Path(model_path).is_file():
        return None
    try:
        from impq_onnx.frontend.canonical import load
        from impq_onnx.frontend.site_analysis import find_sites

        sites = find_sites(load(model_path, logits, check_runtime=False))
    except (ImpqError, OSError, ValueError) as exc:  # the order is a nicety: never fail the report on it
        logger.info("layer order by name: %s", exc)
        return None
    pairs = [(layer.node, layer.activation, layer.op_type, layer.kernel_params) for layer in sites.layers]
    if {pair[0] for pair in pairs} != set(plan.weights):
        return None  # the model changed since the run
    return pairs


def _layers(plan: PrecisionPlan, model_path: str | None, logits: str | None = None):
    order = _network_order(model_path, plan, logits)
    if order is None:
        order = [(node, None, None, None) for node in sorted(plan.weights, key=_natural_key)]
    layers = tuple(LayerBits(node, tuple(plan.weights[node]), act, plan.activations.get(act) if act else None,
                             op_type, kernel_params)
                   for node, act, op_type, kernel_params in order)
    paired = {layer.activation for layer in layers}
    rest = tuple((name, plan.activations[name]) for name in sorted(plan.activations, key=_natural_key)
                 if name not in paired)
    return layers, rest


def _sensitivity(path: Path, last: int) -> tuple[dict | None, int | None]:
    for iteration in range(last, -1, -1):
        file = path / "iterations" / f"{iteration:04d}" / "sensitivity.json"
        if file.is_file():
            return _read_json(file, "sensitivity table"), iteration
    return None, None


def read_run(work_dir: str | Path, label: str | None = None, report: tuple[Path, dict] | None = None) -> RunData:
    """Read one compress work directory; an :class:`ImpqError` naming it when it is not one.

    ``report``: the run's compress report (path, document) when it is not on disk yet."""
    try:
        return _read_run(Path(work_dir), label, report)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a value of the wrong type in its JSON
        raise UserError(f"{work_dir}: the work dir's files are damaged ({type(exc).__name__}: {one_line(exc)}); "
                        "report a run whose work dir is intact") from exc


def _read_run(path: Path, label: str | None, report: tuple[Path, dict] | None) -> RunData:
    if not path.is_dir():
        raise _not_a_work_dir(path, "no such folder" if not path.exists() else "not a folder")
    for name in ("run.json", "state.json"):
        if not (path / name).is_file():
            raise _not_a_work_dir(path, f"no {name}")
    identity = _read_json(path / "run.json", "run identity")
    state = _read_json(path / "state.json", "run state")
    try:
        records = tuple(IterationRecord.from_dict(r) for r in state.get("records") or ())
    except KeyError as exc:
        raise UserError(f"{path / 'state.json'}: an iteration record lacks {exc}; it was written by another "
                        "impq-onnx version, report it with that version") from exc
    if not records:
        raise UserError(f"{path}: the run has not finished an iteration yet; nothing to report")
    last = state.get("final") if state.get("final") is not None else state.get("iteration", records[-1].iteration)
    record = next((r for r in records if r.iteration == last), records[-1])
    plan_file = path / "iterations" / f"{record.iteration:04d}" / "plan.yaml"
    if not plan_file.is_file():
        raise _not_a_work_dir(path, f"no {plan_file.relative_to(path)}")
    plan = PrecisionPlan.load(plan_file)

    if report is not None:
        report_path, document = report
    else:
        report_path = _report_beside(path, records)
        document = _read_json(report_path, "compress report") if report_path else {}
    final = dict(document.get("final") or record.final_metrics())
    final.setdefault("elapsed", state.get("elapsed", record.elapsed))
    config = dict(document.get("config") or {k: v for k, v in identity.items() if k != "model_sha256"})
    layers, rest = _layers(plan, identity.get("model"), identity.get("logits"))
    sensitivity, sensitivity_iteration = _sensitivity(path, int(state.get("iteration", last)))
    return RunData(
        path=path, label=label or path.name.removesuffix(".work"),
        granularity=str(identity.get("granularity", plan.granularity)), records=records,
        reference=dict(document.get("reference") or state.get("reference") or {}), final=final,
        stop_reason=state.get("stop"), config=config, verification=document.get("verification"), plan=plan,
        layers=layers, unpaired_activations=rest, sensitivity=sensitivity,
        sensitivity_iteration=sensitivity_iteration, report_path=report_path,
        environment=document.get("environment"), refit=document.get("refit"),
    )

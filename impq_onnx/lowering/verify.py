"""Prove a lowered model is what the simulation computed, and that its bit-width records are true.

:func:`verify` checks, and reports in a :class:`VerifyResult`:

1. ``onnx.checker`` accepts the lowered model;
2. run in onnxruntime over ``batches``, both models exactly as written (graph optimizations and weight
   pre-packing off, so both compute the same float operations in the same order), the lowered model and
   :func:`impq_onnx.quant.simulate.simulate`'s model agree on 100 % of top-1 predictions, and the integer
   code at every quantized activation site equals the simulation's (:mod:`impq_onnx.lowering.site_codes`:
   where they differ, each site is judged from the simulation's inputs, and a code may be one step off only
   at a rounding tie, counted in ``tie_flips``; anything else is reported as the first site and index);
   the largest absolute logit difference is reported. With optimizations on, onnxruntime would sum some
   layers in another order than the simulation (a Gemm whose constant weight it pre-packs, a fused
   DequantizeLinear + Gemm), which moved the zoo's logits by up to 0.06 through codes flipped at ties;
3. every stored integer lies in its annotated bit range: per kernel ``code_min <= code <= code_max``
   of its bits (odd codes only for the midrise grid, 0 for float kernels), per activation the integer
   range that Clip + QuantizeLinear (or ``Quant``, or the encoding) allows equals the B-bit range;
4. the ``impq.*`` annotations, the sidecar and the graph agree (bits, scales, clips, signedness);
5. every weight code, scale and zero point, and every activation scale, zero point and clip bound,
   equals what lowering the float model under the plan gives, bit for bit, and every scale is > 0
   (:func:`impq_onnx.lowering.exact_codes.exact_mismatches`; the first difference of each tensor is
   reported with its channel and index, in ``record_mismatches``);
6. with the simulation's codes at every site, the largest logit difference is at most ``logit_tolerance``
   (default 0: the layers after the last quantizer compute exactly what the simulation computes);
7. where the target says what onnxruntime computes with every graph optimization on
   (``deployed_reference``; the ort target: its fused integer kernels, :mod:`impq_onnx.lowering.targets.ort_integer`),
   the model run that way equals that reference to the bit on every sample (``deployed_max_logit_diff`` 0);
   ``fused_kernels`` counts the integer kernels onnxruntime fused. When it fused a kind the reference does
   not write out, this CPU is not x86-64 with AVX2, or its u8s8 kernels add pairs of products with int16
   saturation (AVX2 or AVX-512 without VNNI) and a layer's weight codes could saturate them
   (:func:`~impq_onnx.lowering.targets.ort_integer.deployed_coverage`), the comparison is reported
   (``deployed_covered`` false, the reason in ``deployed_note``) but does not fail.

Each output target (:mod:`impq_onnx.lowering.targets`) says how its model runs as standard ops
(``as_standard_ops``: QONNX through :func:`~impq_onnx.lowering.targets.qonnx.qonnx_as_standard_ops`, encodings
through :func:`~impq_onnx.lowering.targets.encodings.apply_encodings`) and where its weight scales and
activation ranges are kept (``weight_scales``, ``activation_range``).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Callable, Iterable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from impq_onnx.frontend.interface import core_view
from impq_onnx.lowering import site_codes
from impq_onnx.lowering.exact_codes import exact_mismatches
from impq_onnx.lowering.passes.annotate_bits import annotated_bits, annotations
from impq_onnx.lowering.passes.quantize_weights import code_bounds
from impq_onnx.lowering.targets import get_target
from impq_onnx.lowering.targets.ort_integer import deployed_coverage, fused_counts
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.quantizers import activation_grid
from impq_onnx.runtime import inference_session
from impq_onnx.quant.standard_rounding import for_inference
from impq_onnx.frontend.sites import SiteTable

__all__ = ["VerifyResult", "verify", "runnable"]


@dataclasses.dataclass
class VerifyResult:
    samples: int = 0
    agreement: float = 0.0  # fraction of samples with the same top-1 class
    max_logit_diff: float = 0.0
    tie_flips: int = 0  # activation codes one step off the simulation's at a rounding tie (float reordering)
    checker_error: str | None = None
    # the model as onnxruntime deploys it (all graph optimizations) against the target's deployed_reference
    deployed_agreement: float | None = None
    deployed_max_logit_diff: float | None = None
    # every fused integer kernel is one the reference writes out, on a CPU whose kernels compute what it writes
    # for this model (ort_integer.deployed_coverage); deployed_note: why not, where not
    deployed_covered: bool | None = None
    deployed_note: str | None = None
    fused_kernels: dict[str, int] = dataclasses.field(default_factory=dict)
    range_violations: list[str] = dataclasses.field(default_factory=list)
    record_mismatches: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.samples > 0 and self.agreement == 1.0 and self.checker_error is None
                and not self.range_violations and not self.record_mismatches)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}


# What a damaged or hand-edited lowered file (missing tensors or sidecar keys, wrong types) raises while read.
_UNREADABLE = (KeyError, IndexError, TypeError, ValueError, AttributeError, StopIteration)


def _guarded(result: VerifyResult, what: str, check: Callable[..., Any], *args: Any) -> Any:
    """``check(*args)``, or None with a mismatch naming what could not be read."""
    try:
        return check(*args)
    except _UNREADABLE as exc:
        result.record_mismatches.append(f"{what}: the lowered model cannot be read as lowered ({type(exc).__name__}: "
                                        f"{str(exc)[:200]}); lower it again")
        return None


def runnable(lowered) -> onnx.ModelProto:
    """A standard-op model that computes what ``lowered`` (any format) means."""
    return get_target(lowered.format).as_standard_ops(lowered)


def verify(lowered, canonical, plan: PrecisionPlan, sites: SiteTable, batches: Iterable, *,
           threads: int | None = None, max_batches: int | None = None, logit_tolerance: float = 0.0) -> VerifyResult:
    """See the module docstring. ``batches`` yields ``x`` or ``(x, y)`` numpy batches."""
    result = VerifyResult()
    try:
        onnx.checker.check_model(lowered.proto)
    except Exception as exc:  # the checker raises ValidationError and C++ errors
        result.checker_error = str(exc).splitlines()[0]
    # A model written with the original's interface (Softmax head, float16, second outputs) is compared on
    # the float32 logits of its quantized core, exactly; the grafted tail is the original's own nodes.
    lowered = dataclasses.replace(lowered, proto=core_view(lowered.proto))
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero or NaN scale is reported, not warned about
        standard = _guarded(result, "runnable model", runnable, lowered)
    # The runnable model's initializers also hold what a target keeps packed (the packed target).
    unpacked = standard.graph.initializer if standard is not None else ()
    inits = {t.name: t for t in (*unpacked, *lowered.proto.graph.initializer)}
    array = lambda name: numpy_helper.to_array(inits[name])  # noqa: E731
    notes = annotations(lowered.proto)
    _guarded(result, "weights", _check_weights, result, lowered, plan, notes, array)
    _guarded(result, "activations", _check_activations, result, lowered, plan, notes, array)
    result.record_mismatches.extend(_guarded(result, "quantizers", exact_mismatches, lowered, canonical, plan, sites)
                                    or [])
    target = get_target(lowered.format)
    if standard is not None:
        deployed = _guarded(result, "deployed model", _deployed_sessions, result, target, standard, threads)
        _compare_outputs(result, standard, for_inference(target.reference(canonical, plan, sites, lowered)),
                         canonical.input_name, batches, threads, max_batches, plan, sites, logit_tolerance, deployed)
    return result


def _deployed_sessions(result: VerifyResult, target, model: onnx.ModelProto, threads: int | None):
    """``(model, target's deployed reference)`` sessions, both with every optimization, or None."""
    reference = target.deployed_reference(model)
    if reference is None:
        return None
    with tempfile.TemporaryDirectory(prefix="impq-verify-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        try:
            deployed = inference_session(model.SerializeToString(), threads, optimize=True, optimized_path=path)
        except Exception:  # onnxruntime's own types; the as-written comparison reports the refusal
            return None
        fused = fused_counts(onnx.load(path, load_external_data=False))
    result.fused_kernels = dict(sorted(fused.items()))
    result.deployed_note = deployed_coverage(reference, result.fused_kernels)
    result.deployed_covered = result.deployed_note is None
    # The reference runs optimized too: float ops the kernels leave (a Conv without an output quantizer, an
    # AveragePool) are then summed in the same order as in the deployed graph; its integer parts are exact.
    return deployed, inference_session(reference.SerializeToString(), threads, optimize=True)


def _runtime_problem(exc: Exception) -> str:
    """The first line of an onnxruntime refusal, without its C++ source location."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return "onnxruntime cannot run the lowered model: " + text.split(" Status Message: ")[0][:300]


def _compare_outputs(result, model, simulated, input_name, batches, threads, max_batches, plan, sites,
                     logit_tolerance: float, deployed=None) -> None:
    """Run both models as written over ``batches``: top-1 agreement, the largest logit difference, and the
    codes of every quantized activation site (:mod:`impq_onnx.lowering.site_codes`)."""
    found = site_codes.probes(model, simulated, plan, sites)
    try:
        lowered_run = inference_session(site_codes.exposed(model, [p.lowered for p in found]).SerializeToString(),
                                        threads, optimize=False)
    except Exception as exc:  # onnxruntime raises its own exception types per status code
        result.record_mismatches.append(_runtime_problem(exc))
        return
    simulated_run = inference_session(
        site_codes.exposed(simulated, [p.simulated for p in found] + [p.site for p in found]).SerializeToString(),
        threads, optimize=False)
    sim_names = [o.name for o in simulated_run.get_outputs()]
    forced_run = None  # built at the first difference of codes
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a refusal is reported as one line below, not as onnxruntime's log
    agree, problem, forced_logit_diff = 0, None, 0.0
    deployed_agree, deployed_diff = 0, 0.0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x = np.asarray(batch[0] if isinstance(batch, (tuple, list)) else batch, np.float32)
        fixed = lowered_run.get_inputs()[0].shape[0]  # a batch the graph bakes in: compare in chunks of it
        step = fixed if isinstance(fixed, int) and 0 < fixed < len(x) else len(x)
        x = x[: len(x) - len(x) % step]
        try:
            got = _chunked(lowered_run, {input_name: x}, step, quiet)
        except Exception as exc:  # as above: a corrupted lowered model may be refused only when run
            result.record_mismatches.append(_runtime_problem(exc))
            break
        want = dict(zip(sim_names, _chunked(simulated_run, {input_name: x}, step)))
        a, b = got[0], want[sim_names[0]]
        agree += int(np.sum(a.argmax(axis=1) == b.argmax(axis=1)))
        diff = np.abs(a - b)
        result.max_logit_diff = max(result.max_logit_diff, float(np.max(np.where(np.isnan(diff), np.inf, diff))))
        same = all(np.array_equal(g, want[p.simulated], equal_nan=True) for g, p in zip(got[1:], found))
        if problem is None and not (same and np.array_equal(a, b, equal_nan=True)):
            # Judge each site from the simulation's inputs: the lowered model, every layer fed the simulation's codes.
            if forced_run is None:
                forced_run = inference_session(site_codes.forced(model, found).SerializeToString(), threads,
                                               optimize=False)
            feeds = {input_name: x, **{p.lowered + site_codes.FORCED_SUFFIX: want[p.simulated] for p in found}}
            own = _chunked(forced_run, feeds, step, quiet)
            for p, g in zip(found, own[1:]):
                pre = x if p.site == input_name else want.get(p.site)
                ties, problem = site_codes.code_difference(p, g, want[p.simulated], pre, result.samples)
                result.tie_flips += ties
                if problem is not None:
                    break
            d = np.abs(own[0] - b)
            forced_logit_diff = max(forced_logit_diff, float(np.max(np.where(np.isnan(d), np.inf, d))))
        if deployed is not None:
            run, expected = (_chunked(s, {input_name: x}, step, quiet)[0] for s in deployed)
            deployed_agree += int(np.sum(run.argmax(axis=1) == expected.argmax(axis=1)))
            d = np.abs(run - expected)
            deployed_diff = max(deployed_diff, float(np.max(np.where(np.isnan(d), np.inf, d))))
        result.samples += len(x)
    result.agreement = agree / result.samples if result.samples else 0.0
    if deployed is not None and result.samples:
        result.deployed_agreement, result.deployed_max_logit_diff = deployed_agree / result.samples, deployed_diff
        if result.deployed_covered and deployed_diff != 0:
            result.record_mismatches.append(
                f"deployed: with every graph optimization, onnxruntime {ort.__version__} computes logits up to "
                f"{deployed_diff:.3g} from the integer reference of its fused kernels (top-1 agreement "
                f"{100 * result.deployed_agreement:.2f} %), which models this CPU's kernels for this model: "
                "the deployed model or the reference is wrong; check the model on the deployment machine")
    if problem is not None:
        result.record_mismatches.append(problem)
    elif not forced_logit_diff <= logit_tolerance:  # NaN logits fail too
        result.record_mismatches.append(
            f"logits: with the simulation's codes at every site, max difference {forced_logit_diff:.3g} from the "
            f"simulation exceeds the tolerance {logit_tolerance:g}; the layers after the last quantizer compute "
            "differently: lower it again from the float model and the plan")


def _chunked(session, feeds: dict, step: int, options=None) -> list[np.ndarray]:
    """``session``'s outputs for ``feeds`` run ``step`` samples at a time (a graph that bakes its batch in)."""
    n = len(next(iter(feeds.values())))
    runs = [session.run(None, {k: v[j : j + step] for k, v in feeds.items()}, options) for j in range(0, n, step)]
    return [np.concatenate(parts) if len(runs) > 1 else parts[0] for parts in zip(*runs)]


def _codes(lowered, entry: dict, array) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Integer codes and per-kernel scales of one stored weight, whatever the format."""
    problems = []
    axis, name = entry["axis"], entry["tensor"]
    stored = array(name)
    target = get_target(lowered.format)
    scale = target.weight_scales(lowered, entry, array)
    if target.stores_codes:
        return stored, scale, problems
    shape = [1] * stored.ndim
    shape[axis] = -1
    quantized = np.array([b is not None for b in entry["bits"]]).reshape(shape)
    stored = np.where(quantized, stored, np.float32(0))  # float kernels are not on a grid (encodings)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # bad scales are reported below
        codes = np.rint(stored / scale.reshape(shape))
        if not np.array_equal((codes * scale.reshape(shape)).astype(np.float32), stored):
            problems.append(f"weight '{name}': values are not integer multiples of their per-channel scale")
        codes = np.nan_to_num(codes, nan=0.0, posinf=0.0, neginf=0.0).astype(np.int64)
    return codes, scale, problems


def _check_weights(result: VerifyResult, lowered, plan: PrecisionPlan, notes: dict, array) -> None:
    sidecar = lowered.sidecar["weights"]
    for node, bits in plan.weights.items():
        entry = sidecar.get(node)
        if entry is None or entry["bits"] != list(bits):
            result.record_mismatches.append(f"sidecar: weights of '{node}' do not match the plan")
            continue
        note = notes.get(entry["tensor"])
        if note is None or note.get("impq.layer") != node or note.get("impq.scheme") != plan.weight_scheme:
            result.record_mismatches.append(f"annotation: '{entry['tensor']}' does not name layer '{node}'")
            continue
        annotated = annotated_bits(note)
        if annotated != list(bits):
            result.record_mismatches.append(f"annotation: bits of '{entry['tensor']}' differ from the sidecar")
        if all(b is None for b in bits):
            continue
        codes, scale, problems = _codes(lowered, entry, array)
        result.range_violations.extend(problems)
        if not np.array_equal(np.float32(scale), np.float32(entry["scale"])):
            result.record_mismatches.append(f"sidecar: scales of '{entry['tensor']}' differ from the graph")
        moved = np.moveaxis(codes, entry["axis"], 0).reshape(len(bits), -1)
        for k, b in enumerate(bits):
            lo, hi, odd = code_bounds(b, plan.weight_scheme)
            row = moved[k].astype(np.int64)
            if row.min() < lo or row.max() > hi or (odd and np.any(row % 2 == 0)):
                result.range_violations.append(
                    f"weight '{entry['tensor']}' kernel {k}: codes {row.min()}..{row.max()} outside the {b}-bit grid")


def _check_activations(result: VerifyResult, lowered, plan: PrecisionPlan, notes: dict, array) -> None:
    sidecar = lowered.sidecar["activations"]
    for tensor, bits in plan.activations.items():
        entry, clip = sidecar.get(tensor), plan.clips[tensor]
        if entry is None or entry["bits"] != bits or entry["clip"] != clip.value or entry["signed"] != clip.signed:
            result.record_mismatches.append(f"sidecar: activation '{tensor}' does not match the plan")
            continue
        note = notes.get(entry["tensor"])
        if note is None or note.get("impq.site") != tensor:
            result.record_mismatches.append(f"annotation: activation '{tensor}' is not annotated")
            continue
        annotated = annotated_bits(note)[0] or 0
        recorded_clip = None if note["impq.clip"] == "null" else float(note["impq.clip"])
        if annotated != (bits or 0) or recorded_clip != clip.value or (note["impq.signed"] == "true") != clip.signed:
            result.record_mismatches.append(f"annotation: activation '{tensor}' differs from the sidecar")
        if bits is None:
            continue
        step, lo, hi = activation_grid(bits, clip.value, clip.signed)
        found = get_target(lowered.format).activation_range(lowered, tensor, entry, array)
        if found is None:
            result.record_mismatches.append(f"graph: no quantizer found for activation '{tensor}'")
            continue
        if (found[0], found[1]) != (lo, hi):
            result.range_violations.append(
                f"activation '{tensor}': integer range {found[0]}..{found[1]} is not the {bits}-bit range {lo}..{hi}")
        if np.float32(found[2]) != np.float32(step) or np.float32(entry["scale"]) != np.float32(step):
            result.record_mismatches.append(f"activation '{tensor}': scale differs from the plan's step")

"""Plan + canonical model -> the deployable model: QDQ (default), QONNX, or float + encodings JSON.

:func:`lower` runs the lowering passes on a clone of the canonical model (initializer tensors are
shared, never copied or modified)::

    QuantizeWeightsPass -> QuantizeActivationsPass -> [SplitConvBiasPass (qdq) | ToQonnxPass | ToEncodingsPass]
    -> AnnotateBitsPass

(the middle step is the output target's rewrite, chosen by ``format`` from the registry in
:mod:`impq_onnx.lowering.targets`) and returns a :class:`LoweredModel`: the ``onnx.ModelProto``, the
sidecar dict and the target's attachments (for the encodings target, the encodings JSON). :func:`write`
writes all files atomically (temporary files renamed into place only after every file was written;
nothing is left behind on error). :func:`lower_file` is the
library function behind ``impq-onnx lower``.

Sidecar ``<out>.bits.json`` (schema ``impq-onnx/bits``, ``schema_version`` 1), readable without ONNX::

    {"schema": "impq-onnx/bits", "schema_version": 1, "format": "qdq" | "qonnx" | "encodings",
     "model": "<file name of the model>", "weight_scheme": ..., "activation_scheme": ..., "granularity": ...,
     "summary": {weight_bits_effective, activation_bits_effective, kernels_quantized, ...},
     "weights": {<layer node>: {"tensor": <stored tensor>, "source": <float weight name>, "op_type": ...,
                 "axis": k, "shape": [...], "dtype": "int8" | "int16" | "int32" | "float32",
                 "bits": [B or null per kernel], "scale": [float per kernel], "zero_point": 0,
                 "code_min": [...], "code_max": [...], "odd_codes": [bool per kernel]}},
     "activations": {<site tensor>: {"tensor": <annotated tensor>, "layers": [...], "bits": B or null,
                     "clip": c, "signed": bool, "scale": step, "zero_point": 0, "dtype": "uint8" | "int8" ...,
                     "code_min": lo, "code_max": hi}}}

Per kernel ``k`` the dequantized weight is ``code · scale[k]`` with ``code_min[k] <= code <= code_max[k]``
(odd only where ``odd_codes[k]``: the midrise grid); ``bits: null`` / ``scale: 1.0`` / codes 0 mark a
float kernel whose values are added as a float tensor. Activations: ``q = scale · clamp(rint(x/scale),
code_min, code_max)``. Floats are written with Python ``repr`` of the float32 value (exact).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from impq_onnx.files import MiB, read_input, write_all
from impq_onnx.errors import PlanError
from impq_onnx.lowering.naming import activation_names, weight_names
from impq_onnx.lowering.passes.annotate_bits import AnnotateBitsPass, read_plan_from_annotation
from impq_onnx.lowering.passes.quantize_activations import QuantizeActivationsPass, activation_dtype
from impq_onnx.lowering.passes.quantize_weights import QuantizeWeightsPass, code_bounds, default_opset
from impq_onnx.lowering.targets import Target, get_target, target_names
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.quantizers import activation_grid
from impq_onnx.frontend.sites import SiteTable

__all__ = ["target_names", "SIDECAR_SCHEMA", "SIDECAR_VERSION", "LoweredModel", "lower", "convert", "write",
           "lower_file", "read_plan_from_annotation", "sidecar_path", "read_lowered"]

SIDECAR_SCHEMA = "impq-onnx/bits"
SIDECAR_VERSION = 1


@dataclasses.dataclass
class LoweredModel:
    proto: onnx.ModelProto
    sidecar: dict
    format: str = "qdq"
    attachments: dict[str, dict | bytes] = dataclasses.field(default_factory=dict)  # {file suffix: JSON | bytes}

    @property
    def encodings(self) -> dict | None:
        """The encodings JSON (format ``encodings`` only)."""
        return self.attachments.get(".encodings")


def sidecar_path(output_path) -> Path:
    return Path(str(output_path) + ".bits.json")


def attachment_path(output_path, suffix: str) -> Path:
    return Path(output_path).with_suffix(suffix)


def lower(canonical, plan: PrecisionPlan, sites: SiteTable, *, format: str = "qdq",
          channel_bitwidth: bool = True, **options: object) -> LoweredModel:
    """Lower ``canonical`` (a CanonicalModel or onnx_ir.Model, not modified) under ``plan``.

    ``options`` go to the target's ``rewrite`` (``encodings_version``, ``static_batch``, ...).
    """
    target = get_target(format)
    plan.validate(sites)
    source = canonical.model if hasattr(canonical, "model") else canonical
    model = source.clone()
    # Called one by one, not through a PassManager, so a PlanError reaches the user unwrapped.
    QuantizeWeightsPass(plan, sites)(model)
    QuantizeActivationsPass(plan, sites)(model)
    sidecar = build_sidecar(model, plan, sites, format)
    attachments = target.rewrite(model, plan, sites, channel_bitwidth=channel_bitwidth, **options)
    AnnotateBitsPass(plan, sites, target=format)(model)
    _retarget_sidecar(sidecar, model, target)
    target.finish_sidecar(sidecar, model)
    proto = ir.serde.serialize_model(model)
    target.finish_model(proto)
    return LoweredModel(proto, sidecar, format, attachments)


def convert(qdq_model: onnx.ModelProto, format: str) -> LoweredModel:
    """Convert a QDQ model made by any tool (onnxruntime's ``quantize_static``, say) into ``format``.

    The target finds the quantizers by graph structure; with no plan, widths come from the stored integer
    types. The result has no sidecar (``{}``): nothing says which bits the tool meant.
    """
    target = get_target(format)
    model = ir.serde.deserialize_model(qdq_model)
    attachments = target.rewrite(model, None, None)
    proto = ir.serde.serialize_model(model)
    target.finish_model(proto)
    return LoweredModel(proto, {}, format, attachments)


def _f(x) -> float:
    return float(np.float32(x))


def build_sidecar(model: ir.Model, plan: PrecisionPlan, sites: SiteTable, format: str) -> dict:
    """The sidecar dict of a QDQ-lowered model (before any target conversion)."""
    graph = model.graph
    opset = default_opset(model)
    weights = {}
    for layer in sites.layers:
        bits = plan.weights[layer.node]
        names = weight_names(layer.weight)
        lowered = names["codes"] in graph.initializers
        bounds = [code_bounds(b, plan.weight_scheme) for b in bits]
        scale = (graph.initializers[names["scale"]].const_value.numpy().reshape(-1) if lowered
                 else np.ones(len(bits), np.float32))
        dtype = graph.initializers[names["codes"]].const_value.numpy().dtype if lowered else np.dtype(np.float32)
        weights[layer.node] = {
            "tensor": names["codes"] if lowered else layer.weight, "source": layer.weight, "op_type": layer.op_type,
            "axis": layer.kernel_axis, "shape": list(layer.weight_shape), "dtype": str(dtype), "bits": list(bits),
            "scale": [_f(s) for s in scale], "zero_point": 0,
            "code_min": [lo for lo, _, _ in bounds], "code_max": [hi for _, hi, _ in bounds],
            "odd_codes": [odd for _, _, odd in bounds],
        }
    activations = {}
    for site in sites.activations:
        bits = plan.activations.get(site.tensor)
        clip = plan.clips[site.tensor]
        entry = {"tensor": site.tensor, "layers": list(site.layers), "bits": bits, "clip": clip.value,
                 "signed": clip.signed, "scale": None, "zero_point": 0, "dtype": "float32",
                 "code_min": None, "code_max": None}
        if bits is not None:
            step, lo, hi = activation_grid(bits, clip.value, clip.signed)
            entry.update({"tensor": activation_names(site.tensor)["quantized"], "scale": _f(step),
                          "dtype": str(activation_dtype(bits, clip.signed, opset, site.tensor)),
                          "code_min": lo, "code_max": hi})
        activations[site.tensor] = entry
    summary = AnnotateBitsPass(plan, sites, target=format)._summary()
    return {"schema": SIDECAR_SCHEMA, "schema_version": SIDECAR_VERSION, "format": format, "model": None,
            "weight_scheme": plan.weight_scheme, "activation_scheme": plan.activation_scheme,
            "granularity": plan.granularity, "summary": summary, "weights": weights, "activations": activations}


def _retarget_sidecar(sidecar: dict, model: ir.Model, target: Target) -> None:
    """Point the sidecar's tensor names at what the target graph actually stores."""
    from impq_onnx.lowering.passes.annotate_bits import annotations

    by_layer = {e["impq.layer"]: t for t, e in annotations(model).items() if e["impq.kind"] == "weight"}
    by_site = {e["impq.site"]: t for t, e in annotations(model).items() if e["impq.kind"] == "activation"}
    for layer, entry in sidecar["weights"].items():
        entry["tensor"] = by_layer[layer]
        stored = model.graph.initializers.get(entry["tensor"])
        if target.stores_codes and stored is not None and stored.const_value is not None:
            entry["dtype"] = str(np.dtype(stored.const_value.dtype.numpy()))  # a target may narrow it (int4)
        if not target.stores_codes and entry["dtype"] != "float32":
            entry["dtype"] = "float32"  # the target stores on-grid float values; the codes are value/scale
    for site, entry in sidecar["activations"].items():
        entry["tensor"] = by_site[site]


def write(lowered: LoweredModel, output_path) -> list[Path]:
    """Write the model, its sidecar (and the target's attachments) atomically; returns the paths written."""
    files = output_files(lowered, output_path)
    write_all(files)
    return list(files)


def output_files(lowered: LoweredModel, output_path) -> dict[Path, bytes]:
    """What :func:`write` writes: the model, ``<out>.bits.json`` and the attachments (``<out>.encodings``)."""
    output_path = Path(output_path)
    sidecar = dict(lowered.sidecar, model=output_path.name)
    files = {output_path: lowered.proto.SerializeToString(),
             sidecar_path(output_path): (json.dumps(sidecar, indent=1, sort_keys=True) + "\n").encode()}
    for suffix, content in lowered.attachments.items():
        files[attachment_path(output_path, suffix)] = (
            content if isinstance(content, bytes) else (json.dumps(content, indent=1, sort_keys=True) + "\n").encode())
    return files


def derived_paths(output_path, format: str) -> list[Path]:
    """The files :func:`write` writes beside ``output_path``: the sidecar and the target's attachments."""
    return [sidecar_path(output_path)] + [attachment_path(output_path, s) for s in get_target(format).attachments]


def lower_file(model_path, plan_path, output_path, format: str = "qdq", *, output: str | None = None,
               input_shape: tuple[int, ...] | None = None, **options: object) -> list[Path]:
    """Load ``model_path``, lower it under the plan at ``plan_path``, write ``output_path`` (+ sidecar)."""
    from impq_onnx.frontend.canonical import load
    from impq_onnx.frontend.site_analysis import find_sites
    from impq_onnx.frontend.model_file import model_inputs
    from impq_onnx.outputs import OutputSet, check_paths

    output_path = Path(output_path)
    derived = derived_paths(output_path, format)
    check_paths([("-o/--output-path", output_path)] + [("the derived output", p) for p in derived],
                {**model_inputs(model_path), "the plan": Path(plan_path)}, flag="-o")
    with OutputSet([output_path, *derived], locked=[output_path]) as outputs:  # locked, staged
        canonical = load(model_path, output=output)
        sites = find_sites(canonical, input_shape)
        plan = PrecisionPlan.load_for(plan_path, sites)
        lowered = lower(canonical, plan, sites, format=format, **options)
        lowered.proto = canonical.with_interface(lowered.proto)  # the interface as declared
        return outputs.commit(output_files(lowered, output_path))


def read_lowered(output_path) -> LoweredModel:
    """Read back what :func:`write` wrote (the model, its sidecar and the target's attachments)."""
    from impq_onnx.frontend.model_file import MAX_MODEL_BYTES, read_model

    output_path = Path(output_path)
    proto = read_model(output_path)
    side = sidecar_path(output_path)
    try:
        sidecar = json.loads(read_input(side, 64 * MiB, "bit-width sidecar", PlanError))
    except PlanError as exc:
        raise PlanError(f"{exc}; lower the model again") from exc
    except ValueError as exc:
        raise PlanError(f"{side}: cannot read the bit-width sidecar ({exc}); lower the model again") from exc
    if sidecar.get("schema") != SIDECAR_SCHEMA or sidecar.get("schema_version") != SIDECAR_VERSION:
        raise PlanError(f"{side}: not an {SIDECAR_SCHEMA} v{SIDECAR_VERSION} sidecar")
    fmt = sidecar.get("format", "qdq")
    attachments = {}
    for suffix in get_target(fmt).attachments:
        path = attachment_path(output_path, suffix)
        try:
            binary = suffix in get_target(fmt).binary_attachments
            raw = read_input(path, MAX_MODEL_BYTES, suffix.lstrip("."), PlanError)  # protobuf's own limit
            attachments[suffix] = raw if binary else json.loads(raw)
        except ValueError as exc:
            raise PlanError(f"{path}: cannot read the {suffix.lstrip('.')} ({exc})") from exc
    return LoweredModel(proto, sidecar, fmt, attachments)

"""Record the bit width of every kernel and activation in the model itself.

``graph.quantization_annotation`` gets one entry per weight tensor and per activation site (also for
those that stay float, so a toolchain learns every width). Keys are namespaced ``impq.*``:

======================  ===================================================================================
key                     value
======================  ===================================================================================
``impq.kind``           ``weight`` or ``activation`` (literal)
``impq.bits``           bits per kernel (weights, along ``impq.axis``) or one value (activations), as
                        comma-separated decimal integers (``"4,3,0,8"``); ``0`` means float (not quantized)
``impq.scale``          name of the per-channel / per-tensor scale initializer (quantized tensors only)
``impq.zero_point``     name of the zero-point initializer (quantized tensors only)
``impq.layer``          weights: the Conv/Gemm/MatMul node name the plan uses (literal)
``impq.axis``           weights: the kernel axis (literal integer)
``impq.site``           activations: the activation site (float tensor name) the plan uses (literal)
``impq.scheme``         weights: ``midrise-max``, ``symmetric-rms`` or ``pow2-std``; activations: ``uniform-clip`` (literal)
``impq.clip``           activations: the clip value as Python ``repr`` of a float, or ``null`` (literal)
``impq.signed``         activations: ``true`` or ``false`` (literal)
======================  ===================================================================================

The annotated tensor is the stored integer tensor (``<weight>_quantized``, ``<tensor>_quantized``) when
the lowering created one, else the float tensor itself. The same entries, keyed by tensor, are also the
JSON of ``metadata_props["impq.annotation"]``: onnxruntime's optimized-model output
(``SessionOptions.optimized_model_filepath``) and ``onnx.version_converter`` drop
``graph.quantization_annotation`` but keep ``metadata_props`` (measured with onnxruntime 1.19.2 and 1.32,
onnx 1.17 and 1.23), so :func:`annotations` reads the metadata copy first. Every value is a literal:
no initializer is added (an initializer that no node reads makes onnxruntime log "Removing initializer"
and is stripped by its optimizer). ``metadata_props["impq.summary"]`` holds a JSON summary (annotation
version, schemes, granularity, counts, effective bits). The packed targets write the metadata copy in a
compact form (:func:`compact_annotation`, marked by ``"impq.compact"``), which :func:`annotations` expands
to the same entries (the kernel widths of packed weights it reads from the model's ``UnpackBits`` node). :func:`read_plan_from_annotation` reads a
:class:`~impq_onnx.quant.plan.PrecisionPlan` back from these entries alone.
"""

from __future__ import annotations

import json
import logging

import onnx
import onnx_ir as ir

from impq_onnx.errors import InternalError, ModelError
from impq_onnx.quant.plan import ActivationClip, PrecisionPlan
from impq_onnx.frontend.sites import SiteTable
from impq_onnx.lowering.naming import activation_names, weight_names
from impq_onnx.lowering.packed_layout import stored_widths
from impq_onnx.lowering.passes.plan_pass import PlanPass

__all__ = ["AnnotateBitsPass", "read_plan_from_annotation", "annotations", "annotated_bits", "ANNOTATION_FIELD",
           "compact_annotation", "expand_annotation", "COMPACT_MARK",
           "SUMMARY_KEY", "ANNOTATION_KEY", "ANNOTATION_VERSION"]

logger = logging.getLogger(__name__)

ANNOTATION_FIELD = "quant_parameter_tensor_names"  # where onnx_ir keeps a value's TensorAnnotation
SUMMARY_KEY = "impq.summary"
ANNOTATION_KEY = "impq.annotation"  # metadata_props copy of every tensor's entries (survives graph rewriters)
ANNOTATION_VERSION = 2  # 2: impq.bits is a literal list, no bit-vector initializers; metadata copy


def _all_values(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        for v in node.outputs:
            values[v.name] = v
    return values


class AnnotateBitsPass(PlanPass):
    """Add the ``impq.*`` quantization annotations, their bit-vector initializers and the summary."""

    def __init__(self, plan: PrecisionPlan, sites: SiteTable, target: str = "qdq"):
        super().__init__(plan, sites)
        self.target = target

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = _all_values(graph)
        modified = False
        self._record: dict[str, dict[str, str]] = {}
        for layer in self.sites.layers:
            bits = self.plan.weights[layer.node]
            names = weight_names(layer.weight)
            tensor = values.get(names["codes"]) or values.get(layer.weight)
            if tensor is None:
                raise InternalError(f"weights: neither '{names['codes']}' nor '{layer.weight}' is in the lowered model")
            entries = {"impq.kind": "weight", "impq.layer": layer.node, "impq.axis": str(layer.kernel_axis),
                       "impq.scheme": self.plan.weight_scheme}
            if tensor.name == names["codes"]:
                entries.update({"impq.scale": names["scale"], "impq.zero_point": names["zero_point"]})
            modified |= self._annotate(graph, tensor, entries, bits)
        for site in self.sites.activations:
            bits = self.plan.activations.get(site.tensor)
            clip = self.plan.clips[site.tensor]
            names = activation_names(site.tensor)
            tensor = values.get(names["quantized"]) if bits is not None else None
            tensor = tensor or values.get(site.tensor)
            if tensor is None:
                raise InternalError(f"activations: tensor '{site.tensor}' is not in the lowered model")
            entries = {"impq.kind": "activation", "impq.site": site.tensor, "impq.scheme": self.plan.activation_scheme,
                       "impq.clip": "null" if clip.value is None else repr(float(clip.value)),
                       "impq.signed": "true" if clip.signed else "false"}
            if tensor.name == names["quantized"]:
                entries.update({"impq.scale": names["scale"], "impq.zero_point": names["zero_point"]})
            modified |= self._annotate(graph, tensor, entries, [bits])
        for key, text in ((ANNOTATION_KEY, json.dumps(self._record, sort_keys=True, separators=(",", ":"))),
                          (SUMMARY_KEY, json.dumps(self._summary(), sort_keys=True))):
            if model.metadata_props.get(key) != text:
                model.metadata_props[key] = text
                modified = True
        return ir.passes.PassResult(model, modified)

    def _annotate(self, graph: ir.Graph, tensor: ir.Value, entries: dict[str, str], bits: list[int | None]) -> bool:
        modified = False
        entries = {**entries, "impq.bits": ",".join(str(0 if b is None else b) for b in bits)}
        self._record[tensor.name] = entries
        current = dict(tensor.meta.get(ANNOTATION_FIELD) or {})
        merged = {k: v for k, v in current.items() if not k.startswith("impq.")} | entries
        if merged != current:
            tensor.meta[ANNOTATION_FIELD] = merged
            modified = True
        return modified

    def _summary(self) -> dict:
        plan, sites = self.plan, self.sites
        kernels = [b for layer in sites.layers for b in plan.weights[layer.node]]
        acts = [plan.activations.get(s.tensor) for s in sites.activations]
        return {
            "annotation_version": ANNOTATION_VERSION,
            "target": self.target,
            "weight_scheme": plan.weight_scheme,
            "activation_scheme": plan.activation_scheme,
            "granularity": plan.granularity,
            "layers": len(sites.layers),
            "kernels_quantized": sum(b is not None for b in kernels),
            "kernels_float": sum(b is None for b in kernels),
            "activations_quantized": sum(b is not None for b in acts),
            "activations_float": sum(b is None for b in acts),
            "weight_bits_effective": round(plan.weight_bits_effective(sites), 6),
            "activation_bits_effective": round(plan.activation_bits_effective(sites), 6),
            "sidecar_suffix": ".bits.json",
        }


def annotations(model) -> dict[str, dict[str, str]]:
    """``{tensor: {key: value}}`` of the ``impq.*`` annotations of an ``onnx.ModelProto`` or ``ir.Model``.

    Read from ``metadata_props["impq.annotation"]`` (kept by graph rewriters), else from
    ``graph.quantization_annotation``.
    """
    metadata = _metadata(model)
    if ANNOTATION_KEY in metadata:
        notes = json.loads(metadata[ANNOTATION_KEY])
        if COMPACT_MARK not in notes:
            return notes
        proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
        return expand_annotation(notes, stored_widths(proto))
    if isinstance(model, onnx.ModelProto):
        return {a.tensor_name: {e.key: e.value for e in a.quant_parameter_tensor_names}
                for a in model.graph.quantization_annotation
                if any(e.key.startswith("impq.") for e in a.quant_parameter_tensor_names)}
    result = {}
    for value in _all_values(model.graph).values():
        entries = value.meta.get(ANNOTATION_FIELD)
        if entries and any(k.startswith("impq.") for k in entries):
            result[value.name] = dict(entries)
    return result


COMPACT_MARK = "impq.compact"  # a compact annotation JSON (:func:`compact_annotation`) has this key


_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"  # a width as one character (0 = float)


def _runs(bits: str) -> str:
    """``"2,2,2,3,8"`` -> ``"2*3.38"``: one character per width (base 36), a run of ``n > 1`` equal ones
    written ``<width>*<n>.``."""
    out: list[list] = []
    for b in bits.split(","):
        if out and out[-1][0] == b:
            out[-1][1] += 1
        else:
            out.append([b, 1])
    return "".join(_DIGITS[int(b)] + ("" if n == 1 else f"*{n}.") for b, n in out)


def _unruns(runs: str) -> str:
    """``"2*3.38"`` -> ``"2,2,2,3,8"``."""
    out, i = [], 0
    while i < len(runs):
        width, i = str(_DIGITS.index(runs[i])), i + 1
        count = 1
        if i < len(runs) and runs[i] == "*":
            end = runs.index(".", i)
            count, i = int(runs[i + 1:end]), end + 1
        out += [width] * count
    return ",".join(out)


def _most_common(values: list) -> object:
    """The most frequent of ``values`` (the first in JSON order of equally frequent ones: deterministic)."""
    counts: dict[str, int] = {}
    for v in values:
        counts[json.dumps(v)] = counts.get(json.dumps(v), 0) + 1
    return json.loads(min(counts, key=lambda v: (-counts[v], v)))


def _named(kind: str, tensor: str) -> dict[str, str]:
    """The entries of annotated ``tensor`` that the lowering's naming (:mod:`~impq_onnx.lowering.naming`) gives
    it: a weight's codes ``<w>_quantized`` have scale ``<w>_scale`` and zero point ``<w>_zero_point``; an
    activation ``<site>_quantized`` has site ``<site>`` and its scale and zero point, any other is its own site.
    A weight's layer defaults to its name up to the last dot (``layer1.0.conv1`` for ``layer1.0.conv1.weight``:
    the names of models exported from PyTorch), though that is the model's convention, not the lowering's."""
    base = tensor.removesuffix("_quantized")
    if kind == "weight":
        names = weight_names(base)
        named = {"scale": names["scale"], "zero_point": names["zero_point"]} if names["codes"] == tensor else {}
        if "." in base:  # PyTorch's exports name a layer's weight '<layer>.weight': a default, kept when it differs
            named["layer"] = base.rsplit(".", 1)[0]
        return named
    if kind == "activation":
        names = activation_names(base)
        if names["quantized"] == tensor:
            return {"site": base, "scale": names["scale"], "zero_point": names["zero_point"]}
        return {"site": tensor}
    return {}


def compact_annotation(notes: dict[str, dict[str, str]], widths: dict[str, str] | None = None) -> dict:
    """The same entries in fewer bytes (for targets whose model size matters, the packed ones)::

        {"impq.compact": 1, <kind>: {"common": {key: value}, "tensors": {tensor: {key: value}}}, ...}

    Entries are grouped by ``impq.kind`` and keys lose their ``impq.`` prefix. Left out of an entry: a
    ``site``, ``scale``, ``zero_point`` or ``layer`` equal to the name :func:`_named` derives from the annotated
    tensor's (the lowering's naming; one the entry lacks is written ``null``); ``bits`` when the model stores the same widths
    elsewhere, ``widths`` (``{scale: bits}``: the packed ``UnpackBits`` node, keyed by the weight's scale);
    then, for each key every entry of its kind has, the most frequent value is written once under
    ``common`` and an entry lists only the keys where it differs. ``bits`` has one character per kernel
    (the width in base 36, ``0`` float) and a run of ``n`` equal widths is written ``<width>*<n>.``
    (``"2*16.38"``: sixteen 2s, a 3, an 8). When every weight of ``widths`` has an entry (its tensor named by
    :func:`_implied`), the group says ``"implied": <how many>`` and lists only those with keys of their
    own (an entry of only common values is implied by the node). :func:`expand_annotation` with the same ``widths`` (and
    :func:`annotations`, which reads them from the model) gives back exactly ``notes``.
    """
    widths = widths or {}
    out: dict = {COMPACT_MARK: 1}
    for kind in sorted({e["impq.kind"] for e in notes.values()}):
        group: dict[str, dict] = {}
        for t, entries in notes.items():
            if entries["impq.kind"] != kind:
                continue
            e: dict = {k.removeprefix("impq."): v for k, v in entries.items()}
            if "scale" in e and widths.get(e["scale"]) == e["bits"]:
                del e["bits"]
            else:
                e["bits"] = _runs(e["bits"])
            for k, v in _named(kind, t).items():
                if k not in e:
                    e[k] = None
                elif e[k] == v:
                    del e[k]
            group[t] = e
        keys = set.intersection(*(set(e) for e in group.values()))
        common = {k: _most_common([e[k] for e in group.values()]) for k in sorted(keys)}
        tensors = {t: {k: v for k, v in e.items() if k not in common or common[k] != v} for t, e in group.items()}
        out[kind] = {"common": common, "tensors": tensors}
        implied = _implied(kind, widths)
        if implied and implied <= set(tensors):
            out[kind] = {"common": common, "implied": len(implied),
                         "tensors": {t: e for t, e in tensors.items() if e or t not in implied}}
    return out


def _implied(kind: str, widths: dict[str, str]) -> set[str]:
    """The weights whose codes the model's ``UnpackBits`` node stores (``widths``, keyed by scale), named by
    the lowering's naming: ``<w>_quantized`` for scale ``<w>_scale``."""
    if kind != "weight":
        return set()
    names = [weight_names(scale.removesuffix("_scale")) for scale in widths]
    return {n["codes"] for n, scale in zip(names, widths) if n["scale"] == scale}


def expand_annotation(compact: dict, widths: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """The ``{tensor: {impq.key: value}}`` entries of a :func:`compact_annotation` (``widths``: the same as
    there; raises :class:`~impq_onnx.errors.ModelError` when an entry's widths are in neither)."""
    widths = widths or {}
    notes = {}
    for kind, group in compact.items():
        if kind == COMPACT_MARK:
            continue
        implied = {t: {} for t in sorted(_implied(kind, widths))} if group.get("implied") else {}
        if len(implied) != group.get("implied", 0):
            raise ModelError(f"annotation: {group['implied']} {kind} entries are implied by the model's UnpackBits "
                             f"node, which has {len(implied)}; lower the model again")
        for tensor, own in {**implied, **group["tensors"]}.items():
            merged = {**_named(kind, tensor), **group["common"], **own}
            entries = {f"impq.{k}": v for k, v in merged.items() if v is not None}
            if "impq.bits" in entries:
                entries["impq.bits"] = _unruns(entries["impq.bits"])
            elif entries.get("impq.scale") in widths:
                entries["impq.bits"] = widths[entries["impq.scale"]]
            else:
                raise ModelError(f"annotation of '{tensor}': no 'bits', and the model stores no widths for its scale "
                                 f"'{entries.get('impq.scale')}' (its UnpackBits node is missing); lower the model again")
            notes[tensor] = dict(sorted(entries.items()))
    return notes


def _metadata(model) -> dict[str, str]:
    if isinstance(model, onnx.ModelProto):
        return {p.key: p.value for p in model.metadata_props}
    return dict(model.metadata_props)


def annotated_bits(entries: dict[str, str]) -> list[int | None]:
    """The bit widths of one annotation entry (``None`` = float)."""
    try:
        return [None if int(b) == 0 else int(b) for b in entries["impq.bits"].split(",")]
    except (KeyError, ValueError) as exc:
        raise ModelError(f"annotation: 'impq.bits' {entries.get('impq.bits')!r} is not a comma-separated list "
                         "of integers; lower the model again") from exc


def read_plan_from_annotation(model) -> PrecisionPlan:
    """The :class:`PrecisionPlan` recorded in a lowered model's annotations and summary."""
    metadata = _metadata(model)
    if SUMMARY_KEY not in metadata:
        raise ModelError(f"the model has no '{SUMMARY_KEY}' metadata; it was not lowered by impq-onnx")
    summary = json.loads(metadata[SUMMARY_KEY])
    weights, activations, clips = {}, {}, {}
    for entries in annotations(model).values():
        bits = annotated_bits(entries)
        if entries["impq.kind"] == "weight":
            weights[entries["impq.layer"]] = bits
        else:
            site = entries["impq.site"]
            clip = entries["impq.clip"]
            activations[site] = bits[0]
            clips[site] = ActivationClip(None if clip == "null" else float(clip), entries["impq.signed"] == "true")
    return PrecisionPlan(weights=weights, activations=activations, clips=clips,
                         weight_scheme=summary["weight_scheme"], activation_scheme=summary["activation_scheme"],
                         granularity=summary["granularity"]).validate()

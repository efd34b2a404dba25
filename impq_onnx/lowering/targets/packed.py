"""Packed target: every weight kernel's codes bit-packed at its true width, for accelerator toolchains.

Writes two files: the model ``out.onnx`` and the weights ``out.packed`` (the attachment with suffix
``.packed``: the packed codes of all weights, one after another, nothing else, so its size is
``Σ ceil(n_k · bits_k / 8)`` bytes). In the model, one node of domain ``ai.impq`` stands for every
weight's codes and DequantizeLinear of the QDQ graph::

    W0_scale, W1_scale, .. ─► ai.impq::UnpackBits(shapes, ranks, axes, to, bits, code_min, code_step)
                           ─► W0 (= code · scale), W1, .. ─► [Add(float kernels)] ─► Conv / Gemm / MatMul

``bits`` holds the width of every kernel (UINT4, weight after weight; one value when all are equal);
kernel ``k`` of a ``b``-bit width has codes ``code_min[b] + code_step[b] · u`` with ``u`` its unsigned
``b``-bit fields, LSB first from the kernel's first byte (each kernel starts on a byte, weights and kernels
in order). ``code_step`` is 2 for the odd codes of the midrise grid, 1 otherwise; a float kernel has width
0 and no bytes (codes 0; its values are in the ``Add``). Full layout and what the written model leaves
out: ``docs/packed-format.md``; a numpy-only copy of :func:`unpack` / :func:`unpack_all` is
``tools/impq_unpack.py``.

The rewrite (:func:`pack_weights`) first gives each weight its own ``UnpackBits`` node yielding the codes,
so that the annotation pass still finds and names every weight's codes tensor; :meth:`PackedTarget.finish_model`
(:func:`compact`) then makes the written form. Runtimes do not know ``UnpackBits``: the files are for
toolchains that read the packed weights. ``verify`` runs :meth:`PackedTarget.as_standard_ops`, which
unpacks every weight back into the QDQ model.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from impq_onnx.errors import InternalError, ModelError
from impq_onnx.frontend.sites import SiteTable
from impq_onnx.lowering.naming import UNPACK_NODE, packed_names, unpacked_names
from impq_onnx.lowering.packed_layout import PACKED_DOMAIN, UNPACK_OP, kernel_layers, stored_widths, widths_tensor
from impq_onnx.lowering.passes.annotate_bits import (
    ANNOTATION_KEY,
    COMPACT_MARK,
    SUMMARY_KEY,
    compact_annotation,
    expand_annotation,
)
from impq_onnx.lowering.patterns import WeightQuantizer, weight_quantizers
from impq_onnx.lowering.targets.base import Lowered, planned_layer
from impq_onnx.lowering.targets.qdq import QdqTarget
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.schemes import weight_scheme

__all__ = ["PackedTarget", "PACKED_DOMAIN", "UNPACK_OP", "SUFFIX", "pack", "unpack", "kernel_table", "grids",
           "packed_as_standard_ops", "pack_weights", "compact", "merge_unpack", "unpack_all", "UNPACK_NODE",
           "widths_tensor", "stored_widths"]



def _field_bits(lo: int, hi: int, step: int) -> int:
    """Bits for the ``(hi - lo) / step + 1`` values ``lo, lo + step, .., hi`` (0 for a single value)."""
    return ((hi - lo) // step).bit_length()


def kernel_table(bounds: list[tuple[int, int, bool]]) -> np.ndarray:
    """``[K, 3]`` int64 rows ``(bits, code_min, code_step)`` from per-kernel ``(lo, hi, odd)`` code bounds."""
    table = np.zeros((len(bounds), 3), np.int64)
    for k, (lo, hi, odd) in enumerate(bounds):
        step = 2 if odd else 1
        table[k] = (_field_bits(lo, hi, step), lo, step)
    return table


def grids(table: np.ndarray) -> tuple[list[int], list[int]]:
    """``(code_min, code_step)`` indexed by bits (``0 .. max bits``) of a ``[K, 3]`` table whose grid is one per
    width (the plan's scheme gives every ``b``-bit kernel the same grid); unused widths get ``(0, 1)``.

    Raises ``ValueError`` when two kernels of the same width have different grids.
    """
    width = int(table[:, 0].max(initial=0)) + 1
    code_min, code_step = [0] * width, [1] * width
    seen: dict[int, tuple[int, int]] = {}
    for k, (bits, lo, step) in enumerate(np.asarray(table, np.int64).tolist()):
        if bits == 0:
            lo, step = 0, 1  # a float kernel: codes 0
        if seen.setdefault(bits, (lo, step)) != (lo, step):
            raise ValueError(f"kernel {k}: {bits}-bit grid ({lo}, step {step}) differs from an earlier kernel's "
                             f"{seen[bits]}")
        code_min[bits], code_step[bits] = lo, step
    return code_min, code_step


def _kernels(codes: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(codes, axis, 0).reshape(codes.shape[axis], -1)


def pack(codes: np.ndarray, axis: int, bits: np.ndarray, code_min: list[int], code_step: list[int]) -> np.ndarray:
    """The codes of each kernel ``k`` packed at ``bits[k]`` bits, kernel after kernel, each from a byte.

    Raises ``ValueError`` naming the kernel when a code is off its grid (below ``code_min[bits]``, not on the
    ``code_step[bits]`` lattice, or above what ``bits`` hold).
    """
    parts = []
    for k, row in enumerate(_kernels(np.asarray(codes), axis)):
        b = int(bits[k])
        lo, step = code_min[b], code_step[b]
        u = (row.astype(np.int64) - lo) // step
        if np.any(lo + u * step != row) or np.any(u < 0) or np.any(u >= (1 << b)):
            raise ValueError(f"kernel {k}: codes {row.min()}..{row.max()} are not on its {b}-bit grid "
                             f"(code_min {lo}, code_step {step})")
        if b:
            stream = ((u[:, None] >> np.arange(b)) & 1).astype(np.uint8).reshape(-1)
            parts.append(np.packbits(stream, bitorder="little"))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def unpack(data: bytes | np.ndarray, offset: int, bits: np.ndarray, code_min: list[int], code_step: list[int],
           shape: tuple[int, ...], axis: int, dtype: np.dtype | type = np.int32) -> np.ndarray:
    """The codes of one weight (``shape``, kernels along ``axis``) from the packed data (its kernels from byte
    ``offset``), its per-kernel ``bits`` and the per-width ``code_min`` / ``code_step``."""
    blob = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else np.asarray(data, np.uint8)
    moved = [shape[axis]] + [s for i, s in enumerate(shape) if i != axis]
    n = int(np.prod(moved[1:], dtype=np.int64))
    out = np.zeros((shape[axis], n), np.int64)
    for k, b in enumerate(np.asarray(bits, np.int64).tolist()):
        u = np.zeros(n, np.int64)
        if b:
            size = (n * b + 7) // 8
            stream = np.unpackbits(blob[offset:offset + size], bitorder="little")[:n * b]
            u = (stream.reshape(n, b).astype(np.int64) << np.arange(b)).sum(axis=1)
            offset += size
        out[k] = code_min[b] + code_step[b] * u
    return np.moveaxis(out.reshape(moved), 0, axis).astype(dtype)


def _table_of(stored: np.ndarray, axis: int, layer_bits: list[int | None] | None, scheme: str,
              lo: int) -> np.ndarray:
    """Planned bounds when the plan is known (the true width ``B``), else one grid from ``lo``, the smallest
    code of the model (each kernel as wide as its largest code needs)."""
    if layer_bits is not None:
        return kernel_table([weight_scheme(scheme).code_bounds(b) for b in layer_bits])
    rows = _kernels(stored, axis)
    table = kernel_table([(lo, int(r.max()), False) for r in rows])
    # A kernel of zeros needs no bits (the float-kernel grid); one of a single other code needs one.
    zero = ~rows.any(axis=1) if rows.size else np.ones(len(rows), bool)
    table[:, 0] = np.where(zero, 0, np.maximum(table[:, 0], 1))
    return table


SUFFIX = ".packed"


def _codes(value: ir.Value) -> tuple[str, ir.TensorProtocol]:
    """Name and constant tensor of a matched weight's codes initializer (the pattern guarantees both)."""
    if value.name is None or value.const_value is None:
        raise InternalError(f"format packed: weight codes '{value.name}' are not a named constant where the matched "
                            "pattern guarantees one")
    return value.name, value.const_value


class PackedTarget(QdqTarget):
    name = "packed"
    help = "QDQ with weight codes bit-packed at their true width in <out>.packed (for toolchains)"
    stores_codes = True
    attachments = (SUFFIX,)
    binary_attachments = (SUFFIX,)

    def rewrite(self, model: ir.Model, plan: PrecisionPlan | None, sites: SiteTable | None,
                **options: object) -> dict[str, dict | bytes]:
        super().rewrite(model, plan, sites, **options)
        return pack_weights(model, plan, sites)

    def finish_model(self, proto: onnx.ModelProto) -> None:
        compact(proto)

    def as_standard_ops(self, lowered: Lowered) -> onnx.ModelProto:
        data = lowered.attachments.get(SUFFIX, b"")
        if not isinstance(data, bytes):
            raise InternalError(f"format packed: the '{SUFFIX}' attachment is JSON, not the packed bytes")
        return packed_as_standard_ops(lowered.proto, data)

    def quantizer_graph(self, lowered: Lowered) -> onnx.ModelProto:
        return self.as_standard_ops(lowered)  # the codes are in the .packed file


def _centered(match: WeightQuantizer) -> tuple[np.ndarray, ir.DataType]:
    """The codes to pack and their type in the standard-op form: the stored codes, or ``code - zero point``
    as int32 where a zero point is not 0 (a QDQ model from another tool: ``(code - z) · scale`` is the same)."""
    _, codes = _codes(match.codes)
    stored = codes.numpy()
    zero = match.zero_point
    if zero is None or zero.const_value is None or not zero.const_value.numpy().any():
        return stored, codes.dtype
    _, _, zero_points, _ = match.arrays()
    return (stored.astype(np.int64) - zero_points.astype(np.int64)).astype(np.int32), ir.DataType.INT32


def pack_weights(model: ir.Model, plan: PrecisionPlan | None, sites: SiteTable | None) -> dict[str, dict | bytes]:
    """Replace every weight's codes initializer of the QDQ graph ``model`` by an ``UnpackBits`` node and drop
    the weight zero points (0, DequantizeLinear's default, or subtracted: :func:`_centered`); returns the
    ``.packed`` attachment."""
    graph = model.graph
    blobs, size = [], 0
    matches = list(weight_quantizers(graph))
    centered = [_centered(m) for m in matches]
    lo = min((int(stored.min(initial=0)) for stored, _ in centered), default=0)
    for match, (stored, dtype) in zip(matches, centered):
        codes_name, codes = _codes(match.codes)
        layer = planned_layer(sites, match.layer) if plan is not None else None
        layer_bits = plan.weights[layer.node] if plan is not None and layer is not None else None
        table = _table_of(stored, match.axis, layer_bits, plan.weight_scheme if plan else "", lo)
        code_min, code_step = grids(table)
        bits = table[:, 0].astype(np.uint8)
        blob = pack(stored, match.axis, bits, code_min, code_step)
        if match.layer.name is None:
            raise InternalError("format packed: an unnamed layer node in the graph (the graph names every node)")
        uniform = bits.size > 0 and bool(np.all(bits == bits[0]))
        node = ir.node(UNPACK_OP, [], {"offset": size, "bits": ir.tensor(bits[:1] if uniform else bits),
                                       "code_min": code_min, "code_step": code_step, "shape": list(stored.shape),
                                       "axis": match.axis, "to": int(dtype)},
                       domain=PACKED_DOMAIN, name=packed_names(codes_name, match.layer.name)["node"])
        blobs.append(blob)
        size += len(blob)
        graph.initializers.pop(codes_name)
        match.dequantize.replace_input_with(0, node.outputs[0])
        node.outputs[0].name = codes_name
        node.outputs[0].dtype = dtype
        node.outputs[0].shape = ir.Shape(stored.shape)
        graph.insert_before(match.dequantize, node)
        zero = match.zero_point
        if zero is not None and zero.const_value is not None:
            match.dequantize.resize_inputs(2)  # 0 (DequantizeLinear's default), or subtracted from the codes
            if zero.name is not None and zero.name in graph.initializers and not zero.uses():
                graph.initializers.pop(zero.name)
    if not blobs:
        return {SUFFIX: b""}  # nothing (left) to pack: the file is still written, empty, so it reads back
    model.opset_imports[PACKED_DOMAIN] = 1
    return {SUFFIX: np.concatenate(blobs).tobytes()}


_ONES = lambda v: all(x == 1 for x in v)  # noqa: E731
# Attributes whose value is the operator's default (ONNX spec), left out of the written model.
_DEFAULTS = {("", "Conv"): {"dilations": _ONES, "strides": _ONES, "group": lambda v: v == 1}}


def compact(proto: onnx.ModelProto) -> None:
    """The written form (``docs/packed-format.md``): the per-layer ``UnpackBits -> DequantizeLinear`` pairs of
    :func:`pack_weights` become one ``UnpackBits`` node (:func:`merge_unpack`), and the model leaves out the
    shapes of intermediate tensors (``value_info``; shape inference recomputes them), Conv attributes at their
    default (``dilations`` and ``strides`` of ones, ``group`` 1) and the second copy of
    the annotation in ``graph.quantization_annotation``: ``metadata_props["impq.annotation"]`` keeps every
    entry, in the compact form of :func:`~impq_onnx.lowering.passes.annotate_bits.compact_annotation`, where
    :func:`~impq_onnx.lowering.passes.annotate_bits.annotations` reads it. Weight entries drop
    ``impq.zero_point``, which names no tensor here (zero points are DequantizeLinear's default 0)."""
    del proto.graph.value_info[:]
    del proto.graph.quantization_annotation[:]
    for node in proto.graph.node:
        defaults = _DEFAULTS.get((node.domain, node.op_type), {})
        for attribute in [a for a in node.attribute if a.name in defaults]:
            if defaults[attribute.name](helper.get_attribute_value(attribute)):
                node.attribute.remove(attribute)
    notes = read_annotations(proto)
    merge_unpack(proto)
    widths = stored_widths(proto)
    for prop in proto.metadata_props:
        if prop.key == ANNOTATION_KEY:
            for entries in notes.values():
                if entries.get("impq.kind") == "weight":
                    entries.pop("impq.zero_point", None)
            prop.value = json.dumps(compact_annotation(notes, widths), sort_keys=True, separators=(",", ":"))
        elif prop.key == SUMMARY_KEY:
            prop.value = json.dumps(json.loads(prop.value), sort_keys=True, separators=(",", ":"))


def read_annotations(proto: onnx.ModelProto) -> dict[str, dict[str, str]]:
    """The ``impq.*`` annotation entries of ``proto``'s metadata (compact or not); ``{}`` without them."""
    text = next((p.value for p in proto.metadata_props if p.key == ANNOTATION_KEY), "{}")
    notes = json.loads(text)
    return expand_annotation(notes, stored_widths(proto)) if COMPACT_MARK in notes else notes


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def merge_unpack(proto: onnx.ModelProto) -> None:
    """Replace every ``UnpackBits -> DequantizeLinear`` pair by one output of a single ``UnpackBits`` node."""
    graph = proto.graph
    pairs = []
    for node in graph.node:
        if node.domain == PACKED_DOMAIN and node.op_type == UNPACK_OP and len(node.input) == 0:
            users = [n for n in graph.node if node.output[0] in n.input]
            if len(users) != 1 or users[0].op_type != "DequantizeLinear" or len(users[0].input) != 2:
                raise InternalError(f"format packed: '{node.output[0]}' is not read by one DequantizeLinear alone")
            pairs.append((node, users[0]))
    if not pairs:
        return
    shapes, ranks, axes, to, bits = [], [], [], [], []
    used: dict[int, tuple[int, int]] = {}  # width -> (code_min, code_step)
    size = 0
    for unpack_bits, dq in pairs:
        attrs = _attributes(unpack_bits)
        if attrs["offset"] != size:
            raise InternalError(f"format packed: '{unpack_bits.output[0]}' does not follow the previous weight")
        shape, axis = list(attrs["shape"]), attrs["axis"]
        dq_axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        per_axis = [t for t in graph.initializer if t.name == dq.input[1] and len(t.dims) == 1 and t.dims[0] > 1]
        if per_axis and dq_axis % max(len(shape), 1) != axis:
            raise InternalError(f"format packed: '{dq.name}' dequantizes along {dq_axis}, not the kernel axis {axis}")
        kernel_bits = np.broadcast_to(numpy_helper.to_array(attrs["bits"]), (shape[axis],))
        for b in sorted({int(b) for b in kernel_bits}):
            grid = (attrs["code_min"][b], attrs["code_step"][b])
            if used.setdefault(b, grid) != grid:
                raise ModelError(f"format packed: the {b}-bit grid of '{dq.output[0]}' differs from another "
                                 "layer's; lower the float model (not one already quantized) with one weight scheme")
        size += sum((int(np.prod(shape)) // shape[axis] * int(b) + 7) // 8 for b in kernel_bits)
        shapes += shape
        ranks.append(len(shape))
        axes.append(axis)
        to.append(attrs["to"])
        bits.append(kernel_bits)
    code_min = [used.get(b, (0, 1))[0] for b in range(max(used, default=0) + 1)]
    code_step = [used.get(b, (0, 1))[1] for b in range(max(used, default=0) + 1)]
    every = np.concatenate(bits).astype(np.uint8)
    if every.size and np.all(every == every[0]):
        every = every[:1]
    merged = helper.make_node(UNPACK_OP, [dq.input[1] for _, dq in pairs], [dq.output[0] for _, dq in pairs],
                              name=UNPACK_NODE, domain=PACKED_DOMAIN, shapes=shapes, ranks=ranks, axes=axes, to=to,
                              bits=widths_tensor(every), code_min=code_min, code_step=code_step)
    for unpack_bits, dq in pairs:
        graph.node.remove(unpack_bits)
        graph.node.remove(dq)
    graph.node.insert(0, merged)
    _drop_zero_residuals(proto, graph.node[0])  # insert copied the message


def _drop_zero_residuals(proto: onnx.ModelProto, merged: onnx.NodeProto) -> None:
    """Remove each ``Add`` of an all-zero tensor behind an ``UnpackBits`` output. The QDQ form has one behind
    every weight stored wider than int8, only so that onnxruntime does not fuse its DequantizeLinear into an
    int8 kernel (:mod:`~impq_onnx.lowering.passes.quantize_weights`); :func:`packed_as_standard_ops` puts it
    back."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = list(merged.output)
    for node in [n for n in graph.node if n.op_type == "Add" and n.input and n.input[0] in outputs]:
        zeros = inits.get(node.input[1]) if len(node.input) == 2 else None
        if zeros is None or numpy_helper.to_array(zeros).any() or any(
                node.input[1] in n.input for n in graph.node if n is not node):
            continue
        merged.output[outputs.index(node.input[0])] = node.output[0]
        graph.node.remove(node)
        graph.initializer.remove(zeros)


def unpack_all(node: onnx.NodeProto, data: bytes | np.ndarray) -> list[np.ndarray]:
    """The codes of every output of a merged ``UnpackBits`` node, in output order."""
    attrs = _attributes(node)
    blob = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else np.asarray(data, np.uint8)
    out, offset = [], 0
    for layer in kernel_layers(node):
        shape, axis, bits = layer["shape"], layer["axis"], layer["bits"]
        out.append(unpack(blob, offset, bits, list(attrs["code_min"]), list(attrs["code_step"]), shape, axis,
                          helper.tensor_dtype_to_np_dtype(layer["to"])))
        n = int(np.prod(shape)) // shape[axis]
        offset += sum((n * int(b) + 7) // 8 for b in bits)
    return out


def packed_as_standard_ops(proto: onnx.ModelProto, data: bytes) -> onnx.ModelProto:
    """The QDQ model that ``proto`` with packed weights ``data`` stands for: the ``UnpackBits`` node replaced
    by each weight's codes (named as the annotation names them) and a DequantizeLinear."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    codes_of = {e["impq.scale"]: tensor for tensor, e in read_annotations(proto).items()
                if e.get("impq.kind") == "weight" and "impq.scale" in e}
    per_axis = {t.name for t in graph.initializer if len(t.dims) == 1 and t.dims[0] > 1}  # else per tensor
    for node in [n for n in graph.node if n.domain == PACKED_DOMAIN and n.op_type == UNPACK_OP]:
        index = list(graph.node).index(node)
        graph.node.remove(node)
        for scale, output, codes, layer in zip(node.input, node.output, unpack_all(node, data), kernel_layers(node)):
            names = unpacked_names(output)
            name = codes_of.get(scale, names["codes"])
            graph.initializer.append(numpy_helper.from_array(codes, name))
            axis = {"axis": layer["axis"]} if scale in per_axis else {}
            residual = any(n.op_type == "Add" and n.input[0] == output for n in graph.node)
            if codes.dtype == np.int8 or residual:
                graph.node.insert(index, helper.make_node("DequantizeLinear", [name, scale], [output],
                                                          name=names["dequantize"], **axis))
                continue
            # Wide codes: the zero Add of the QDQ form, so that onnxruntime does not fuse them into an int8 kernel.
            shape = [1] * codes.ndim
            shape[layer["axis"]] = codes.shape[layer["axis"]]
            graph.initializer.append(numpy_helper.from_array(np.zeros(shape, np.float32), names["zeros"]))
            graph.node.insert(index, helper.make_node("Add", [names["dequantized"], names["zeros"]], [output],
                                                      name=names["zeros_add"]))
            graph.node.insert(index, helper.make_node("DequantizeLinear", [name, scale], [names["dequantized"]],
                                                      name=names["dequantize"], **axis))
    kept = [o for o in out.opset_import if o.domain != PACKED_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    return out

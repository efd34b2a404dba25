"""Packed target: every weight kernel's codes bit-packed at its true width, for accelerator toolchains.

Writes two files: the model ``out.onnx`` and the weights ``out.packed`` (the attachment with suffix
``.packed``: the packed codes of all layers, one after another, nothing else, so its size is
``Σ ceil(n_k · bits_k / 8)`` bytes). In the model, each layer's integer codes initializer ``W_quantized``
of the QDQ graph is replaced by a node of domain ``ai.impq`` that says where its codes are::

    W_quantized_packed_table (int32 [K, 4]) ─► ai.impq::UnpackBits(shape, axis, to) ─► W_quantized
                                            ─► DequantizeLinear ─► ...

Everything after it (scale, zero point 0, the float-kernel ``Add``, activations, annotation) is the QDQ
target's. Table row ``k`` = ``(bits, byte_offset, code_min, code_step)`` of kernel ``k`` (the slice ``k``
along ``axis``); its ``n`` codes, in C order of the weight with ``axis`` moved first, are the unsigned
``u`` in ``bits`` bits each, written into ``out.packed`` from ``byte_offset`` as one little-endian bit
stream (bit ``j`` of a kernel is ``(data[byte_offset + j // 8] >> (j % 8)) & 1``; value ``i`` is bits
``i·bits .. i·bits + bits - 1``, least significant first; the last byte is zero-padded, so each kernel
starts on a byte). ``code = code_min + code_step · u`` and the weight is ``code · scale[k]`` (the
DequantizeLinear scale). ``code_step`` is 2 for the odd codes of the midrise grid, 1 otherwise; a
float kernel has ``bits`` 0 and no bytes (codes 0; its values are in the ``Add``). Full layout:
``docs/packed-format.md``; a numpy-only copy of :func:`unpack` is ``tools/impq_unpack.py``.

Runtimes do not know ``UnpackBits``: the files are for toolchains that read the packed weights.
``verify`` runs :meth:`PackedTarget.as_standard_ops`, which unpacks every layer back into the QDQ model.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from impq_onnx.errors import InternalError
from impq_onnx.frontend.sites import SiteTable
from impq_onnx.lowering.naming import packed_names
from impq_onnx.lowering.patterns import weight_quantizers
from impq_onnx.lowering.targets.base import Lowered, planned_layer
from impq_onnx.lowering.targets.qdq import QdqTarget
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.schemes import weight_scheme

__all__ = ["PackedTarget", "PACKED_DOMAIN", "UNPACK_OP", "SUFFIX", "pack", "unpack", "kernel_table",
           "packed_as_standard_ops"]

PACKED_DOMAIN = "ai.impq"
UNPACK_OP = "UnpackBits"


def _field_bits(lo: int, hi: int, step: int) -> int:
    """Bits for the ``(hi - lo) / step + 1`` values ``lo, lo + step, .., hi`` (0 for a single value)."""
    return ((hi - lo) // step).bit_length()


def kernel_table(bounds: list[tuple[int, int, bool]]) -> np.ndarray:
    """``[K, 4]`` int32 rows ``(bits, 0, code_min, code_step)`` from per-kernel ``(lo, hi, odd)`` code bounds;
    :func:`pack` fills in the byte offsets."""
    table = np.zeros((len(bounds), 4), np.int32)
    for k, (lo, hi, odd) in enumerate(bounds):
        step = 2 if odd else 1
        table[k] = (_field_bits(lo, hi, step), 0, lo, step)
    return table


def _kernels(codes: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(codes, axis, 0).reshape(codes.shape[axis], -1)


def pack(codes: np.ndarray, axis: int, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(blob, table)``: the codes of each kernel packed at ``table[k, 0]`` bits (offsets filled in).

    Raises ``ValueError`` naming the kernel when a code is off its grid (below ``code_min``, not on the
    ``code_step`` lattice, or above what ``bits`` hold).
    """
    table = np.array(table, np.int32)
    parts, offset = [], 0
    for k, row in enumerate(_kernels(np.asarray(codes), axis)):
        bits, _, lo, step = (int(v) for v in table[k])
        u = (row.astype(np.int64) - lo) // step
        if np.any(lo + u * step != row) or np.any(u < 0) or np.any(u >= (1 << bits)):
            raise ValueError(f"kernel {k}: codes {row.min()}..{row.max()} are not on its {bits}-bit grid "
                             f"(code_min {lo}, code_step {step})")
        table[k, 1] = offset
        if bits:
            stream = ((u[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
            parts.append(np.packbits(stream, bitorder="little"))
            offset += len(parts[-1])
    blob = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return blob, table


def unpack(blob: np.ndarray, table: np.ndarray, shape: tuple[int, ...], axis: int,
           dtype: np.dtype | type = np.int32) -> np.ndarray:
    """The codes of one weight (``shape``, kernels along ``axis``) from its blob and ``[K, 4]`` table."""
    blob = np.asarray(blob, np.uint8)
    moved = [shape[axis]] + [s for i, s in enumerate(shape) if i != axis]
    n = int(np.prod(moved[1:], dtype=np.int64))
    out = np.zeros((shape[axis], n), np.int64)
    for k, (bits, offset, lo, step) in enumerate(np.asarray(table, np.int64)):
        if bits:
            stream = np.unpackbits(blob[offset:offset + (n * bits + 7) // 8], bitorder="little")[:n * bits]
            u = (stream.reshape(n, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)
        else:
            u = np.zeros(n, np.int64)
        out[k] = lo + step * u
    return np.moveaxis(out.reshape(moved), 0, axis).astype(dtype)


def _table_of(stored: np.ndarray, axis: int, layer_bits: list[int | None] | None, scheme: str) -> np.ndarray:
    """Planned bounds when the plan is known (the true width ``B``), else each kernel's stored range."""
    if layer_bits is not None:
        return kernel_table([weight_scheme(scheme).code_bounds(b) for b in layer_bits])
    rows = _kernels(stored, axis)
    return kernel_table([(int(r.min()), int(r.max()), False) for r in rows])


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
        graph = model.graph
        blobs, size = [], 0
        for match in weight_quantizers(graph):
            codes_name, codes = _codes(match.codes)
            stored = codes.numpy()
            layer = planned_layer(sites, match.layer) if plan is not None else None
            layer_bits = plan.weights[layer.node] if plan is not None and layer is not None else None
            blob, table = pack(stored, match.axis, _table_of(stored, match.axis, layer_bits,
                                                             plan.weight_scheme if plan else ""))
            table[:, 1] += size
            blobs.append(blob)
            size += len(blob)
            if match.layer.name is None:
                raise InternalError("format packed: an unnamed layer node in the graph (the graph names every node)")
            names = packed_names(codes_name, match.layer.name)
            value = ir.Value(name=names["table"], const_value=ir.tensor(table, name=names["table"]))
            graph.register_initializer(value)
            dtype = codes.dtype
            node = ir.node(UNPACK_OP, [value], {"shape": list(stored.shape), "axis": match.axis, "to": int(dtype)},
                           domain=PACKED_DOMAIN, name=names["node"])
            graph.initializers.pop(codes_name)
            match.dequantize.replace_input_with(0, node.outputs[0])
            node.outputs[0].name = codes_name
            node.outputs[0].dtype = dtype
            node.outputs[0].shape = ir.Shape(stored.shape)
            graph.insert_before(match.dequantize, node)
        if not blobs:
            return {SUFFIX: b""}  # nothing (left) to pack: the file is still written, empty, so it reads back
        model.opset_imports[PACKED_DOMAIN] = 1
        return {SUFFIX: np.concatenate(blobs).tobytes()}

    def as_standard_ops(self, lowered: Lowered) -> onnx.ModelProto:
        data = lowered.attachments.get(SUFFIX, b"")
        if not isinstance(data, bytes):
            raise InternalError(f"format packed: the '{SUFFIX}' attachment is JSON, not the packed bytes")
        return packed_as_standard_ops(lowered.proto, data)

    def quantizer_graph(self, lowered: Lowered) -> onnx.ModelProto:
        return self.as_standard_ops(lowered)  # the codes are in the .packed file


def packed_as_standard_ops(proto: onnx.ModelProto, data: bytes) -> onnx.ModelProto:
    """The QDQ model that ``proto`` with packed weights ``data`` stands for: every ``UnpackBits`` replaced
    by the codes it unpacks."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    blob = np.frombuffer(data, np.uint8)
    inits = {t.name: t for t in graph.initializer}
    for node in [n for n in graph.node if n.domain == PACKED_DOMAIN and n.op_type == UNPACK_OP]:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        codes = unpack(blob, numpy_helper.to_array(inits[node.input[0]]), tuple(attrs["shape"]), attrs["axis"],
                       helper.tensor_dtype_to_np_dtype(attrs["to"]))
        graph.initializer.append(numpy_helper.from_array(codes, node.output[0]))
        graph.node.remove(node)
        graph.initializer.remove(inits[node.input[0]])
    kept = [o for o in out.opset_import if o.domain != PACKED_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    return out

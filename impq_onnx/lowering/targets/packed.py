"""Packed target: every weight kernel's codes bit-packed at its true width, for accelerator toolchains.

The QDQ graph's integer codes initializer ``W_quantized`` of each layer is replaced by a node of domain
``ai.impq`` that names where the codes are kept::

    W_packed (uint8 [N]) ─┐
    W_packed_table (int32 [K, 4]) ─► ai.impq::UnpackBits(shape, axis, to) ─► W_quantized ─► DequantizeLinear ─► ...

Everything after it (scale, zero point 0, the float-kernel ``Add``, activations, annotation) is the QDQ
target's. Table row ``k`` = ``(bits, byte_offset, code_min, code_step)`` of kernel ``k`` (the slice ``k``
along ``axis``); its ``n`` codes, in C order of the weight with ``axis`` moved first, are the unsigned
``u`` in ``bits`` bits each, written into the blob from ``byte_offset`` as one little-endian bit stream
(bit ``j`` of a kernel is ``(blob[byte_offset + j // 8] >> (j % 8)) & 1``; value ``i`` is bits
``i·bits .. i·bits + bits - 1``, least significant first; the last byte is zero-padded, so each kernel
starts on a byte). ``code = code_min + code_step · u`` and the weight is ``code · scale[k]`` (the
DequantizeLinear scale). ``code_step`` is 2 for the odd codes of the midrise grid, 1 otherwise; a
float kernel has ``bits`` 0 and no bytes (codes 0; its values are in the ``Add``). Full layout:
``docs/packed-format.md``; a numpy-only copy of :func:`unpack` is ``tools/impq_unpack.py``.

Runtimes do not know ``UnpackBits``: the file is for toolchains that read the blobs. ``verify`` runs
:meth:`PackedTarget.as_standard_ops`, which unpacks every blob back into the QDQ model.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from impq_onnx.frontend.sites import SiteTable
from impq_onnx.lowering.naming import packed_names
from impq_onnx.lowering.patterns import weight_quantizers
from impq_onnx.lowering.targets.base import planned_layer
from impq_onnx.lowering.targets.qdq import QdqTarget
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.schemes import weight_scheme

__all__ = ["PackedTarget", "PACKED_DOMAIN", "UNPACK_OP", "pack", "unpack", "kernel_table", "packed_as_standard_ops"]

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


class PackedTarget(QdqTarget):
    name = "packed"
    help = "QDQ with weight codes bit-packed at their true width (ai.impq::UnpackBits; for toolchains)"
    stores_codes = True

    def rewrite(self, model: ir.Model, plan: PrecisionPlan | None, sites: SiteTable | None,
                **options: object) -> dict[str, dict]:
        super().rewrite(model, plan, sites, **options)
        graph = model.graph
        for match in weight_quantizers(graph):
            stored = match.codes.const_value.numpy()
            layer = planned_layer(sites, match.layer) if plan is not None else None
            layer_bits = plan.weights[layer.node] if layer is not None else None
            table = _table_of(stored, match.axis, layer_bits, plan.weight_scheme if plan else "")
            blob, table = pack(stored, match.axis, table)
            names = packed_names(match.codes.name, match.layer.name)
            inputs = []
            for key, array in (("blob", blob), ("table", table)):
                value = ir.Value(name=names[key], const_value=ir.tensor(array, name=names[key]))
                graph.register_initializer(value)
                inputs.append(value)
            node = ir.node(UNPACK_OP, inputs, {"shape": list(stored.shape), "axis": match.axis,
                                               "to": int(match.codes.const_value.dtype)}, domain=PACKED_DOMAIN,
                           name=names["node"])
            codes_name = match.codes.name
            graph.initializers.pop(codes_name)
            match.dequantize.replace_input_with(0, node.outputs[0])
            node.outputs[0].name = codes_name
            node.outputs[0].dtype = match.codes.const_value.dtype
            node.outputs[0].shape = ir.Shape(stored.shape)
            graph.insert_before(match.dequantize, node)
        model.opset_imports[PACKED_DOMAIN] = 1
        return {}

    def as_standard_ops(self, lowered) -> onnx.ModelProto:
        return packed_as_standard_ops(lowered.proto)


def packed_as_standard_ops(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The QDQ model ``proto`` stands for: every ``UnpackBits`` replaced by the codes it unpacks."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    unpackers = [n for n in graph.node if n.domain == PACKED_DOMAIN and n.op_type == UNPACK_OP]
    for node in unpackers:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        dtype = helper.tensor_dtype_to_np_dtype(attrs["to"])
        codes = unpack(numpy_helper.to_array(inits[node.input[0]]), numpy_helper.to_array(inits[node.input[1]]),
                       tuple(attrs["shape"]), attrs["axis"], dtype)
        graph.initializer.append(numpy_helper.from_array(codes, node.output[0]))
        graph.node.remove(node)
        for name in node.input:
            graph.initializer.remove(inits[name])
    kept = [o for o in out.opset_import if o.domain != PACKED_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    return out

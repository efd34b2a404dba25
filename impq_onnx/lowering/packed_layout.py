"""The layout of the merged ``ai.impq::UnpackBits`` node of the packed targets (``docs/packed-format.md``), apart
from :mod:`~impq_onnx.lowering.targets.packed` so that the annotation reader
(:mod:`~impq_onnx.lowering.passes.annotate_bits`) takes the kernel widths from the node without importing a target."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["PACKED_DOMAIN", "UNPACK_OP", "widths_tensor", "kernel_layers", "stored_widths"]

PACKED_DOMAIN = "ai.impq"
UNPACK_OP = "UnpackBits"


def widths_tensor(widths: np.ndarray) -> onnx.TensorProto:
    """The ``bits`` attribute of a merged ``UnpackBits``: the widths as ONNX ``UINT4`` (two per byte, the first
    in the low nibble: ONNX's own 4-bit layout), or ``UINT8`` when a width exceeds 15."""
    widths = np.asarray(widths, np.uint8).reshape(-1)
    if widths.size and int(widths.max()) > 15:
        return numpy_helper.from_array(widths)
    nibbles = np.unpackbits(widths[:, None], axis=1, bitorder="little")[:, :4].reshape(-1)
    return helper.make_tensor("", onnx.TensorProto.UINT4, [widths.size],
                              np.packbits(nibbles, bitorder="little").tobytes(), raw=True)


def kernel_layers(node: onnx.NodeProto) -> list[dict]:
    """Per output of a merged ``UnpackBits``: ``shape``, ``axis``, ``to``, ``bits`` (per kernel)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    layers, start, kernel = [], 0, 0
    bits = numpy_helper.to_array(attrs["bits"]).astype(np.int64)  # UINT4 or UINT8
    for rank, axis, to in zip(attrs["ranks"], attrs["axes"], attrs["to"]):
        shape = tuple(attrs["shapes"][start:start + rank])
        start += rank
        k = shape[axis]
        layer_bits = np.repeat(bits, k) if bits.size == 1 else bits[kernel:kernel + k]
        kernel += k
        layers.append({"shape": shape, "axis": axis, "to": to, "bits": layer_bits})
    return layers


def stored_widths(proto: onnx.ModelProto) -> dict[str, str]:
    """``{scale: "b,b,.."}``: the kernel widths of every output of the merged ``UnpackBits`` node, keyed by the
    weight's scale (its input), as ``impq.bits`` writes them; the packed annotation leaves them out
    (:func:`~impq_onnx.lowering.passes.annotate_bits.compact_annotation`)."""
    widths = {}
    for node in proto.graph.node:
        if (node.domain == PACKED_DOMAIN and node.op_type == UNPACK_OP
                and any(a.name == "ranks" for a in node.attribute)):
            for scale, layer in zip(node.input, kernel_layers(node)):
                widths[scale] = ",".join(str(int(b)) for b in layer["bits"])
    return widths

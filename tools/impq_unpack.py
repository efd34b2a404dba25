#!/usr/bin/env python3
"""Reference unpacker for impq-onnx's packed weights (docs/packed-format.md). numpy only; copy it freely.

    codes = unpack(data, table, shape, axis)     # data: the bytes of <model>.packed; table: int32 [K, 4]

Table row ``k`` = ``(bits, byte_offset, code_min, code_step)`` of kernel ``k`` (the slice ``k`` along
``axis``). Kernel ``k``'s ``n`` values (C order of the weight with ``axis`` moved first) are ``bits``-bit
unsigned ``u``, as one little-endian bit stream from ``byte_offset``: bit ``j`` is
``(data[byte_offset + j // 8] >> (j % 8)) & 1`` and ``u_i = sum_t bit[i·bits + t] << t``.
Then ``code = code_min + code_step · u`` and ``weight = code · scale[k]`` (the DequantizeLinear scale).

Run as a script (needs the ``onnx`` package only to read the model):
``python3 impq_unpack.py model.onnx`` prints every packed weight's shape and code range.
"""

from __future__ import annotations

import sys

import numpy as np


def unpack(data: bytes | np.ndarray, table: np.ndarray, shape: tuple[int, ...], axis: int,
           dtype: type = np.int32) -> np.ndarray:
    """The integer codes of one weight of ``shape`` (kernels along ``axis``)."""
    blob = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else np.asarray(data, np.uint8)
    moved = [shape[axis]] + [s for i, s in enumerate(shape) if i != axis]
    n = int(np.prod(moved[1:], dtype=np.int64))
    out = np.zeros((shape[axis], n), np.int64)
    for k, (bits, offset, code_min, code_step) in enumerate(np.asarray(table, np.int64)):
        u = np.zeros(n, np.int64)
        if bits:
            stream = np.unpackbits(blob[offset:offset + (n * bits + 7) // 8], bitorder="little")[:n * bits]
            u = (stream.reshape(n, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)
        out[k] = code_min + code_step * u
    return np.moveaxis(out.reshape(moved), 0, axis).astype(dtype)


def main(model_path: str) -> None:
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(model_path)
    data = open(model_path.rsplit(".", 1)[0] + ".packed", "rb").read()
    tables = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.domain == "ai.impq" and node.op_type == "UnpackBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            codes = unpack(data, tables[node.input[0]], tuple(attrs["shape"]), attrs["axis"])
            print(f"{node.output[0]}: shape {list(codes.shape)}, codes {codes.min()}..{codes.max()}, "
                  f"bits {sorted(set(tables[node.input[0]][:, 0].tolist()))}")


if __name__ == "__main__":
    main(sys.argv[1])

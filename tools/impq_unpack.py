#!/usr/bin/env python3
"""Reference unpacker for impq-onnx's packed weights (docs/packed-format.md). numpy only; copy it freely.

The model has one node ``ai.impq::UnpackBits``: input ``i`` is weight ``i``'s per-kernel scale, output ``i``
its float weight ``code · scale`` (kernels along ``axes[i]``). The codes are in ``<model>.packed``, weight
after weight, kernel after kernel, each kernel from a byte::

    codes = unpack(data, offset, bits, code_min, code_step, shape, axis)   # one weight, from byte offset

Kernel ``k`` has ``bits[k]`` bits per value; its ``n`` values (C order of the weight with ``axis`` moved
first) are unsigned ``u`` in one little-endian bit stream: bit ``j`` is
``(data[start + j // 8] >> (j % 8)) & 1`` and ``u_i = sum_t bit[i·bits + t] << t``; the next kernel starts at
``start + ceil(n · bits / 8)``. Then ``code = code_min[bits] + code_step[bits] · u`` (``bits`` 0: code 0).

The node's ``bits`` attribute is an ONNX ``UINT4`` tensor (two widths per byte, the first in the low
nibble; ``UINT8`` when a width exceeds 15): ``onnx.numpy_helper.to_array`` gives one value per kernel.

Run as a script (needs the ``onnx`` package only to read the model):
``python3 impq_unpack.py model.onnx`` prints every packed weight's shape, code range and widths.
"""

from __future__ import annotations

import sys

import numpy as np


def unpack(data: bytes | np.ndarray, offset: int, bits: np.ndarray, code_min: list[int], code_step: list[int],
           shape: tuple[int, ...], axis: int, dtype: type = np.int32) -> np.ndarray:
    """The integer codes of one weight of ``shape`` (kernels along ``axis``) whose first kernel starts at
    byte ``offset``."""
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


def layers(attrs: dict) -> list[tuple[tuple[int, ...], int, np.ndarray]]:
    """``(shape, axis, bits per kernel)`` of every output of the ``UnpackBits`` node with attributes ``attrs``
    (``bits`` a numpy array: one value per kernel of the model, or one value for every kernel)."""
    out, start, kernel = [], 0, 0
    bits = np.asarray(attrs["bits"]).reshape(-1)
    for rank, axis in zip(attrs["ranks"], attrs["axes"]):
        shape = tuple(attrs["shapes"][start:start + rank])
        start += rank
        k = shape[axis]
        out.append((shape, axis, np.repeat(bits, k) if bits.size == 1 else bits[kernel:kernel + k]))
        kernel += k
    return out


def unpack_all(data: bytes, attrs: dict) -> list[np.ndarray]:
    """The codes of every output of the ``UnpackBits`` node with attributes ``attrs``, in output order."""
    codes, offset = [], 0
    for shape, axis, bits in layers(attrs):
        codes.append(unpack(data, offset, bits, attrs["code_min"], attrs["code_step"], shape, axis))
        n = int(np.prod(shape)) // shape[axis]
        offset += sum((n * int(b) + 7) // 8 for b in bits)
    return codes


def main(model_path: str) -> None:
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(model_path)
    data = open(model_path.rsplit(".", 1)[0] + ".packed", "rb").read()
    scales = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.domain == "ai.impq" and node.op_type == "UnpackBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            attrs["bits"] = numpy_helper.to_array(attrs["bits"])
            for output, scale, codes, (_, _, bits) in zip(node.output, node.input, unpack_all(data, attrs),
                                                          layers(attrs)):
                print(f"{output}: shape {list(codes.shape)}, codes {codes.min()}..{codes.max()}, "
                      f"bits {sorted(set(bits.tolist()))}, scale {scales[scale].shape}")


if __name__ == "__main__":
    main(sys.argv[1])

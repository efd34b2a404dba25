"""Store a model's initializers in external data files of at most ``--max-bytes`` each, beside it.

The project commits no file over 2 MB; a model larger than that is committed as its graph (``model.onnx``) plus
``model.onnx.data-1``, ``model.onnx.data-2``, ... in the same folder. Every reader loads it unchanged: impq-onnx
(``impq_onnx.frontend.model_file``), ``onnx.load`` and onnxruntime all read external data relative to the model.
The weights are not touched: the script checks that the split model's tensors equal the original's, bit for bit.

    python models/split_external.py models/mobilenet-v1-cifar10/model.onnx

rewrites the model in place (atomically, with its data files first). The split is deterministic: tensors in graph
order, each file filled up to ``--max-bytes``, offsets aligned to 64 bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

ALIGN = 64  # bytes; onnxruntime reads any offset, 64 keeps every tensor's start aligned for SIMD loads


def split(model: onnx.ModelProto, name: str, max_bytes: int) -> dict[str, bytes]:
    """Move every initializer's raw data of ``model`` into files named ``<name>.data-<k>``; return their bytes."""
    files: list[bytearray] = [bytearray()]
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data"):
            tensor.raw_data = numpy_helper.to_array(tensor).tobytes()
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(field)
        data = tensor.raw_data
        if len(data) > max_bytes:
            raise SystemExit(f"{tensor.name}: {len(data)} bytes, more than --max-bytes {max_bytes}")
        current = files[-1]
        offset = -len(current) % ALIGN + len(current)
        if offset + len(data) > max_bytes and current:
            files.append(bytearray())
            current, offset = files[-1], 0
        current.extend(b"\0" * (offset - len(current)))
        current.extend(data)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", f"{name}.data-{len(files)}"), ("offset", str(offset)),
                           ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return {f"{name}.data-{k + 1}": bytes(b) for k, b in enumerate(files)}


def _write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--max-bytes", type=int, default=1_800_000, help="the largest data file (default 1.8 MB)")
    args = parser.parse_args(argv)
    original = onnx.load(args.model)  # external data, if any, loaded
    model = onnx.ModelProto()
    model.CopyFrom(original)
    files = split(model, args.model.name, args.max_bytes)
    graph = model.SerializeToString()
    for name, data in files.items():
        _write(args.model.parent / name, data)
    _write(args.model, graph)
    reread = onnx.load(args.model)
    for a, b in zip(original.graph.initializer, reread.graph.initializer, strict=True):
        x, y = numpy_helper.to_array(a), numpy_helper.to_array(b)
        if a.name != b.name or x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            raise SystemExit(f"{args.model}: tensor {a.name} differs after the split")
    sizes = ", ".join(f"{name} {len(data)} bytes" for name, data in files.items())
    print(f"{args.model}: graph {len(graph)} bytes, {sizes}; {len(original.graph.initializer)} tensors identical",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

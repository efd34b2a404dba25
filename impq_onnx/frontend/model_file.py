"""Reading an ONNX file as untrusted input.

A model file may be truncated, not ONNX at all, claim tensors far larger than the bytes it
carries, or point its external data anywhere on the disk. Everything here turns those into
one-line :class:`ModelError` messages before any large allocation happens. The file itself is
only ever opened for reading.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from impq_onnx.errors import ModelError
from impq_onnx.files import MiB, open_input, read_input

MAX_MODEL_BYTES = 2048 * MiB  # protobuf's own limit for one message

__all__ = ["read_model", "read_model_digest", "model_digest", "model_inputs", "MAX_OPSET", "MIN_OPSET",
           "MAX_TENSOR_BYTES"]

MIN_OPSET = 7
# onnxruntime(-training) 1.19 implements the default domain up to opset 21.
MAX_OPSET = 21
# One tensor larger than this is refused: no classifier weight is 4 GiB, and numpy would try to
# allocate whatever a hostile file claims.
MAX_TENSOR_BYTES = 4 << 30

_ITEMSIZE = {
    TensorProto.FLOAT: 4, TensorProto.DOUBLE: 8, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2,
    TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.INT16: 2, TensorProto.UINT16: 2,
    TensorProto.INT32: 4, TensorProto.UINT32: 4, TensorProto.INT64: 8, TensorProto.UINT64: 8,
    TensorProto.BOOL: 1,
}
_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
_PACKED_4BIT = {TensorProto.INT4, TensorProto.UINT4}  # two elements per byte (and per int32_data entry)


def _nbytes(count: int, data_type: int) -> int:
    return (count + 1) // 2 if data_type in _PACKED_4BIT else count * _ITEMSIZE.get(data_type, 8)


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse ``path`` into a ModelProto with external data loaded, or raise a one-line ModelError."""
    path = Path(path)
    proto = _parse_file(path)[1]
    _load_external_data(proto, path)
    return proto


def read_model_digest(path: str | os.PathLike) -> tuple[onnx.ModelProto, str]:
    """:func:`read_model` and :func:`model_digest` from one read of the file: the digest is of the very bytes the
    model was parsed from, and the file is parsed once."""
    path = Path(path)
    data, proto = _parse_file(path)
    locations = _external_locations(proto)
    _load_external_data(proto, path)  # refuses external data outside the model's folder before the digest reads it
    return proto, _digest(path, data, locations)


def _parse_file(path: Path) -> tuple[bytes, onnx.ModelProto]:
    """The file's bytes and its parse (external data not loaded), checked, or a one-line ModelError."""
    data = _read_model_file(path)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        hint = "the file looks truncated; copy or export it again" if data[:1] == b"\x08" else "is it an .onnx file?"
        raise ModelError(f"{path}: not a readable ONNX model ({exc}); {hint}") from exc
    if proto.ir_version <= 0 or not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ModelError(f"{path}: not an ONNX model (no IR version or empty graph); is it an .onnx file?")
    check_opset(proto, path)
    check_tensor_sizes(proto, path)
    return data, proto


def _read_model_file(path: Path) -> bytes:
    """The model file's bytes: a regular file within protobuf's limit, opened without blocking (a FIFO or a
    device given as the model is refused in one line, never read)."""
    if not os.path.lexists(path):
        raise ModelError(f"{path}: no such model file")
    return read_input(path, MAX_MODEL_BYTES, "model file", ModelError)


def _parse_quietly(data: bytes) -> onnx.ModelProto | None:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        return None
    return proto


def _external_locations(proto: onnx.ModelProto | None) -> list[str]:
    """The external data files ``proto``'s tensors name, each once, in the order they first name them."""
    if proto is None:
        return []
    locations = (_external_entries(t).get("location") for t in _all_tensors(proto)
                 if t.data_location == TensorProto.EXTERNAL)
    return list(dict.fromkeys(location for location in locations if location))


def _external_entries(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _external_number(tensor: TensorProto, entries: dict[str, str], key: str, path) -> int | None:
    """The tensor's external ``offset`` or ``length`` (None when absent), or a one-line ModelError: onnx's own
    reader raises a bare ValueError on ``offset: "abc"``."""
    value = entries.get(key)
    if not value:
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise ModelError(f"{path}: tensor '{tensor.name}' gives its external data {key} as {value!r}, not a whole "
                         "number; the file is corrupt") from exc


def model_inputs(path: str | os.PathLike, what: str = "the input model") -> dict[str, Path]:
    """``path`` and the external data files its tensors name, as the inputs no output may overwrite
    (:func:`impq_onnx.outputs.check_paths`): ``--output weights.bin`` must not replace the weights of a model
    that keeps them in ``weights.bin``. A file that does not parse is only itself (reading it refuses it later)."""
    path = Path(path)
    inputs = {what: path}
    if path.is_file():
        try:
            data = _read_model_file(path)
        except ModelError:  # reading it refuses it later, in one line
            return inputs
        for location in _external_locations(_parse_quietly(data)):
            inputs[f"{what}'s external data file '{location}'"] = path.parent / location
    return inputs


def model_digest(path: str | os.PathLike) -> str:
    """The sha256 a work dir records for a model file: of the file's bytes, then, when its tensors keep their data in
    external files, of each file's name and bytes in the order the tensors first name them, so that a resume
    notices new weights in either. A single-file model's digest is the sha256 of the file (what every work dir has
    recorded). Call it after :func:`read_model` accepted the file: the locations are not checked again here."""
    path = Path(path)
    if not path.is_file():
        return hashlib.sha256(b"").hexdigest()
    data = _read_model_file(path)
    return _digest(path, data, _external_locations(_parse_quietly(data)))


def _digest(path: Path, data: bytes, locations: list[str]) -> str:
    digest = hashlib.sha256(data)
    for location in locations:
        digest.update(b"\0" + os.fsencode(location) + b"\0")
        target = path.resolve().parent / location
        if target.is_file():
            # in chunks: a data file may be far larger than the tensors it holds
            with open_input(target, 1 << 62, "external data file", ModelError) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def check_opset(proto: onnx.ModelProto, path: Path | str) -> int:
    versions = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise ModelError(f"{path}: imports no ai.onnx opset; re-export it as a standard ONNX model")
    opset = versions[0]
    if opset > MAX_OPSET:
        raise ModelError(
            f"{path}: opset {opset} is newer than {MAX_OPSET}, the newest that onnxruntime-training 1.19 "
            f"runs; re-export with opset <= {MAX_OPSET}"
        )
    if opset < MIN_OPSET:
        raise ModelError(f"{path}: opset {opset} is older than {MIN_OPSET}; re-export with opset >= {MIN_OPSET}")
    return opset


def _all_tensors(proto: onnx.ModelProto):
    yield from proto.graph.initializer
    for node in _all_nodes(proto.graph):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


def _claimed_elements(tensor: TensorProto, path) -> int:
    count = 1
    for d in tensor.dims:
        if d < 0:
            raise ModelError(f"{path}: tensor '{tensor.name}' has a negative dimension {list(tensor.dims)}")
        count *= d
    nbytes = _nbytes(count, tensor.data_type)
    if nbytes > MAX_TENSOR_BYTES:
        raise ModelError(
            f"{path}: tensor '{tensor.name}' claims {count} elements ({nbytes / 2**30:.1f} GiB), "
            f"more than the {MAX_TENSOR_BYTES >> 30} GiB allowed; the file is corrupt or not a classifier"
        )
    return count


def check_tensor_sizes(proto: onnx.ModelProto, path) -> None:
    """Refuse tensors whose stored data does not match their claimed shape."""
    for tensor in _all_tensors(proto):
        count = _claimed_elements(tensor, path)
        if tensor.data_location == TensorProto.EXTERNAL or tensor.data_type in (0, TensorProto.STRING):
            continue
        if tensor.HasField("raw_data"):
            stored, expected, unit = len(tensor.raw_data), _nbytes(count, tensor.data_type), "bytes"
        else:
            # Typed fields hold one entry per element (float16 and int8 are widened into int32_data).
            stored, unit = sum(len(getattr(tensor, f)) for f in _TYPED_FIELDS), "values"
            expected = (count + 1) // 2 if tensor.data_type in _PACKED_4BIT else count
        if stored != expected:
            raise ModelError(
                f"{path}: tensor '{tensor.name}' with shape {list(tensor.dims)} stores {stored} {unit} "
                f"instead of {expected}; the file is corrupt"
            )


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    base = path.resolve().parent
    external = [t for t in _all_tensors(proto) if t.data_location == TensorProto.EXTERNAL]
    for tensor in external:
        entries = _external_entries(tensor)
        location = entries.get("location", "")
        if not location:
            raise ModelError(f"{path}: tensor '{tensor.name}' keeps its data externally but names no file; "
                             "the file is corrupt")
        target = (base / location).resolve()
        if os.path.isabs(location) or ".." in Path(location).parts or base not in target.parents:
            raise ModelError(
                f"{path}: tensor '{tensor.name}' points its external data at '{location}', outside the "
                "model's folder; refusing it (move the data file beside the model and use a relative name)"
            )
        if not target.is_file():
            what = "is not a regular file (a folder, FIFO or device)" if os.path.exists(target) else (
                "is a link that leads nowhere" if os.path.islink(base / location) else "is missing")
            raise ModelError(f"{path}: external data file '{location}' of tensor '{tensor.name}' {what}; put the "
                             "model's data file beside it")
        size = target.stat().st_size
        offset = _external_number(tensor, entries, "offset", path) or 0
        given_length = _external_number(tensor, entries, "length", path)
        length = size - offset if given_length is None else given_length
        if offset < 0 or offset + length > size or length != _nbytes(_claimed_elements(tensor, path), tensor.data_type):
            raise ModelError(
                f"{path}: tensor '{tensor.name}' claims bytes {offset}..{offset + length} of '{location}' "
                f"({size} bytes) for shape {list(tensor.dims)}; the external data does not match"
            )
        with open_input(target, 1 << 62, "external data file", ModelError) as f:  # a FIFO swapped in: refused
            f.seek(offset)
            tensor.raw_data = f.read(length)
        del tensor.external_data[:]
        tensor.ClearField("data_location")  # as if stored inline: the same model in one file or many, same bytes

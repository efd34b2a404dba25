"""Untrusted and broken model files: each gets a one-line ModelError naming the file and the fix."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper

import impq_onnx
from impq_onnx.errors import ModelError
from impq_onnx.frontend.canonical import load_with_digest
from impq_onnx.frontend.model_file import model_digest, read_model, read_model_digest
from impq_onnx.runtime import inference_session
from quant_models import tiny_cnn
from tiny_models import Quirks, build, sample_input


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_not_an_onnx_file(tmp_path):
    path = tmp_path / "photo.onnx"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    with pytest.raises(ModelError) as exc:
        impq_onnx.load(path)
    assert str(path) in _one_line(exc) and "not" in str(exc.value)


def test_empty_protobuf_is_not_a_model(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelError, match="not an ONNX model"):
        impq_onnx.load(path)


def test_truncated_file(tmp_path):
    data = build(Quirks()).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelError) as exc:
        impq_onnx.load(path)
    assert str(path) in _one_line(exc)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        impq_onnx.load(tmp_path / "absent.onnx")


def test_opset_newer_than_runtime_limit(tmp_path):
    proto = build(Quirks())
    proto.opset_import[0].version = 22
    path = tmp_path / "new.onnx"
    onnx.save(proto, path)
    with pytest.raises(ModelError) as exc:
        impq_onnx.load(path)
    assert "opset 22 is newer than 21" in _one_line(exc) and "onnxruntime" in str(exc.value)


def test_no_float_weights_to_quantize():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(ModelError, match="nothing to quantize"):
        impq_onnx.find_sites(impq_onnx.from_proto(proto))


def test_op_onnxruntime_cannot_run_is_named():
    proto = build(Quirks())
    proto.graph.node.insert(4, helper.make_node("FancyRelu", ["r1"], ["r1b"], domain="vendor.ops", name="fancy"))
    for node in proto.graph.node:
        if node.name == "dwconv":
            node.input[0] = "r1b"
    proto.opset_import.append(helper.make_opsetid("vendor.ops", 1))
    with pytest.raises(ModelError) as exc:
        impq_onnx.from_proto(proto, label="m.onnx")
    assert "node 'fancy'" in _one_line(exc) and "vendor.ops:FancyRelu" in str(exc.value)


def test_node_onnxruntime_rejects_on_the_logits_path_is_named():
    proto = build(Quirks())
    proto.graph.node.insert(3, helper.make_node("Cast", ["r1"], ["r1i"], to=TensorProto.INT16, name="to_int16"))
    proto.graph.node.insert(4, helper.make_node("Relu", ["r1i"], ["r1j"], name="int_relu"))  # no int16 Relu
    proto.graph.node.insert(5, helper.make_node("Cast", ["r1j"], ["r1f"], to=TensorProto.FLOAT, name="back"))
    for node in proto.graph.node:
        if node.name == "dwconv":
            node.input[0] = "r1f"
    with pytest.raises(ModelError) as exc:
        impq_onnx.from_proto(proto, label="m.onnx")
    assert "m.onnx: node 'int_relu' (Relu)" in _one_line(exc)


def _save_external(tmp_path, location: str):
    proto = build(Quirks())
    external_data_helper.convert_model_to_external_data(proto, all_tensors_to_one_file=True, location="weights.bin",
                                                        size_threshold=0)
    path = tmp_path / "model.onnx"
    onnx.save(proto, path)  # writes weights.bin beside it
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, path, save_as_external_data=False)
    return path


def test_external_data_is_loaded_relative_to_the_model(tmp_path):
    path = _save_external(tmp_path, "weights.bin")
    canonical = impq_onnx.load(path)
    x = sample_input(Quirks())
    session = inference_session(canonical.to_bytes())
    logits = session.run(None, {"image": x})[0]
    reference = inference_session(build(Quirks()).SerializeToString()).run(None, {"image": x})[0]
    assert np.max(np.abs(logits - reference)) <= 1e-6
    onnx.save(build(Quirks()), tmp_path / "inline.onnx")
    assert canonical.to_bytes() == impq_onnx.load(tmp_path / "inline.onnx").to_bytes()  # as if stored inline


@pytest.mark.parametrize("location", ["../weights.bin", "/etc/passwd", "sub/../../weights.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    path = _save_external(folder, location)
    (tmp_path / "weights.bin").write_bytes((folder / "weights.bin").read_bytes())
    with pytest.raises(ModelError) as exc:
        impq_onnx.load(path)
    assert "outside the model's folder" in _one_line(exc) and location in str(exc.value)


def test_external_data_through_a_symlink_out_of_the_folder_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    path = _save_external(folder, "weights.bin")
    outside = tmp_path / "elsewhere.bin"
    (folder / "weights.bin").rename(outside)
    (folder / "weights.bin").symlink_to(outside)
    with pytest.raises(ModelError, match="outside the model's folder"):
        impq_onnx.load(path)


@pytest.mark.parametrize("make, words", [
    (lambda weights: weights.unlink(), "is missing"),
    (lambda weights: (weights.unlink(), os.mkfifo(weights)), "is not a regular file (a folder, FIFO or device)"),
    (lambda weights: (weights.unlink(), weights.symlink_to(weights.parent / "gone.bin")),
     "is a link that leads nowhere"),
])
def test_external_data_that_is_not_a_file_says_what_it_is(tmp_path, make, words):
    """Before: a FIFO or a dangling link was called "missing" while ls showed it there."""
    path = _save_external(tmp_path, "weights.bin")
    make(tmp_path / "weights.bin")
    with pytest.raises(ModelError) as exc:
        impq_onnx.load(path)
    assert "external data file 'weights.bin' of tensor" in _one_line(exc) and words in str(exc.value)


def test_external_data_shorter_than_claimed(tmp_path):
    path = _save_external(tmp_path, "weights.bin")
    data = (tmp_path / "weights.bin").read_bytes()
    (tmp_path / "weights.bin").write_bytes(data[:100])
    with pytest.raises(ModelError, match="does not match"):
        impq_onnx.load(path)


@pytest.mark.parametrize("key, value, words", [
    ("offset", "abc", "gives its external data offset as 'abc', not a whole number"),
    ("length", "1e3", "gives its external data length as '1e3', not a whole number"),
    ("location", "", "keeps its data externally but names no file"),
])
def test_malformed_external_data_entries_are_one_line(tmp_path, key, value, words):
    # onnx's ExternalDataInfo raised a bare ValueError on these (an internal error, exit 1, before)
    path = _save_external(tmp_path, "weights.bin")
    proto = onnx.load(path, load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == key:
            entry.value = value
    onnx.save(proto, path, save_as_external_data=False)
    with pytest.raises(ModelError) as exc:
        impq_onnx.load(path)
    assert words in _one_line(exc) and proto.graph.initializer[0].name in str(exc.value)


def test_absurd_tensor_size_fails_cleanly(tmp_path):
    proto = build(Quirks())
    huge = proto.graph.initializer[0]
    del huge.dims[:]
    huge.dims.extend([1 << 20, 1 << 20, 1 << 10])  # 2^50 floats claimed, a few hundred bytes stored
    path = tmp_path / "huge.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelError) as exc:
        impq_onnx.load(path)
    assert "claims" in _one_line(exc) and "conv1.w" in str(exc.value)


def test_tensor_with_fewer_bytes_than_its_shape(tmp_path):
    proto = build(Quirks())
    tensor = proto.graph.initializer[0]
    tensor.raw_data = tensor.raw_data[:-8]
    path = tmp_path / "short.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelError, match="conv1.w.*corrupt"):
        impq_onnx.load(path)


def test_typed_data_fields_are_counted():
    weights = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [2, 3], weights.ravel().tolist())
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x], [y], [tensor])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert impq_onnx.find_sites(impq_onnx.from_proto(proto)).layers[0].kernels == 3
    tensor = proto.graph.initializer[0]
    del tensor.float_data[-1]
    with pytest.raises(ModelError, match="stores 5 values instead of 6"):
        impq_onnx.from_proto(proto)


def _external_cnn(folder, seed: int):
    """quant_models.tiny_cnn(seed) saved as folder/m.onnx with every initializer in folder/w.bin; the .onnx bytes
    do not depend on the seed (same names, shapes, offsets), only w.bin's do."""
    proto = tiny_cnn(seed)
    external_data_helper.convert_model_to_external_data(proto, all_tensors_to_one_file=True, location="w.bin",
                                                        size_threshold=0)
    (folder / "w.bin").unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(proto, folder / "m.onnx")
    return folder / "m.onnx"


def test_the_digest_covers_external_data_and_is_the_file_hash_without_it(tmp_path):
    single = tmp_path / "single.onnx"
    onnx.save(build(Quirks()), single)
    assert model_digest(single) == hashlib.sha256(single.read_bytes()).hexdigest()  # what old work dirs recorded
    path = _external_cnn(tmp_path, 0)
    first, graph = model_digest(path), path.read_bytes()
    _external_cnn(tmp_path, 1)
    assert path.read_bytes() == graph  # only the weights file changed ...
    assert model_digest(path) != first  # ... and the digest sees it
    _external_cnn(tmp_path, 0)
    assert model_digest(path) == first


def test_loading_with_the_digest_gives_the_model_and_the_digest_of_one_read(tmp_path):
    """compress reads the model once for both (canonical.load_with_digest); each must equal its own reader's."""
    single = tmp_path / "single.onnx"
    onnx.save(build(Quirks()), single)
    external = _external_cnn(tmp_path, 0)
    for path in (single, external):
        proto, digest = read_model_digest(path)
        assert digest == model_digest(path)
        assert proto.SerializeToString() == read_model(path).SerializeToString()
        model, digest = load_with_digest(path)
        assert digest == model_digest(path)
        assert model.to_bytes() == impq_onnx.load(path).to_bytes()
    (tmp_path / "w.bin").write_bytes(b"short")  # external data that does not match: refused, not digested
    with pytest.raises(ModelError, match="external data does not match"):
        read_model_digest(external)


def test_a_resume_refuses_a_model_whose_external_weights_changed(tmp_path):
    from quant_models import quadrant_batch

    from impq_onnx.compression import compress
    from impq_onnx.errors import ConfigError

    rng = np.random.default_rng(0)
    (x, y), (xv, yv) = quadrant_batch(96, rng), quadrant_batch(32, rng)
    data = {"train": (x, y), "val": (xv, yv)}
    tiny = dict(preprocess="model-input", phases="weights", max_iterations=0, steps=2, batch_size=16, lr=0.005,
                sensitivity_samples=16, target_bits=None, target_act_bits=None, report=False, progress=False)
    path = _external_cnn(tmp_path, 0)
    compress(str(path), data, output=tmp_path / "out.onnx", **tiny)
    _external_cnn(tmp_path, 1)  # new weights under the same graph file
    with pytest.raises(ConfigError, match="'model_sha256' was"):
        compress(str(path), data, output=tmp_path / "out.onnx", resume=True, **tiny)
    _external_cnn(tmp_path, 0)  # the weights it ran with: resumes
    assert compress(str(path), data, output=tmp_path / "out.onnx", resume=True, **tiny).iterations


def test_no_output_may_overwrite_the_models_external_data(tmp_path):
    from impq_onnx.frontend.model_file import model_inputs
    from impq_onnx.outputs import PathError, check_paths

    path = _external_cnn(tmp_path, 0)
    inputs = model_inputs(path)
    assert inputs == {"the input model": path, "the input model's external data file 'w.bin'": tmp_path / "w.bin"}
    with pytest.raises(PathError, match="external data file 'w.bin'"):
        check_paths([("--output", tmp_path / "w.bin")], inputs)

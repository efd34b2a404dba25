"""Issue 24, what the zoo matrix broke, each reproduced on a tiny model built in code:

- AveragePool on the trained path (tf2onnx NHWC and Caffe2 exports: "Can broadcast 0 by 0 or 1" in the Relu
  gradient; DenseNet's transitions: SIGFPE) -> an exact Conv/Div equivalent in the training graph only;
- equal LayerNorm scales merged by onnxruntime's ConstantSharing ("Duplicate definition of name ..._grad");
- a batch written as ``dim_value: -1`` (paddle2onnx: "negative dimensions are not allowed");
- dynamo's ``Reshape(allowzero=1)`` with the batch baked in (the batch stayed fixed);
- a batch the graph really bakes in (fine-tune, calibration and verification ran a batch of 4 on it);
- dynamic height/width with a MaxPool (a zero-sized gradient in the first training step);
- a linear, cubic or fractional Resize (no ResizeGrad kernel) -> two MatMuls with its interpolation matrices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tiny_models import Quirks, build
from zoo_models import batch_baked_into_features, image_folder, static_batch

from impq_onnx.compression import compress
from impq_onnx.engine.differentiable import make_differentiable
from impq_onnx.frontend.canonical import from_proto
from impq_onnx.frontend.interface import interface_of
from impq_onnx.runtime import inference_session

TINY = dict(steps=2, start_steps=2, sensitivity_samples=8, batch_size=4, max_iterations=1, target_bits=None,
            target_act_bits=None, threads=1, progress=False, report=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_folder(tmp_path_factory.mktemp("fixes") / "data", per_class=4)


def _insert_after(model: onnx.ModelProto, name: str, op: str, **attrs) -> onnx.ModelProto:
    """``op`` on the output of node ``name``, feeding what read that output."""
    graph = model.graph
    node = next(n for n in graph.node if n.name == name)
    out, new = node.output[0], f"{name}_{op.lower()}"
    for reader in graph.node:
        reader.input[:] = [new if i == out else i for i in reader.input]
    graph.node.insert(list(graph.node).index(node) + 1, helper.make_node(op, [out], [new], name=new, **attrs))
    return model


def _compress(model: onnx.ModelProto, data: Path, tmp_path: Path) -> onnx.ModelProto:
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    result = compress(path, data, output=out, **TINY)
    assert result.iterations[-1].fine_tune_steps > 0
    assert path.read_bytes() == before
    written = onnx.load(out)
    assert interface_of(written) == interface_of(model)
    return written


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[2, 2], strides=[2, 2]),
    dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),  # count_include_pad=0: border counts differ
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0], count_include_pad=1),
    dict(kernel_shape=[3, 2], auto_pad="VALID"),
])
def test_average_pool_rewrite_is_exact(attrs: dict) -> None:
    graph = helper.make_graph([helper.make_node("AveragePool", ["x"], ["y"], name="pool", **attrs)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 7, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert make_differentiable(rewritten) == 1
    assert "AveragePool" not in {n.op_type for n in rewritten.graph.node}
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 9)).astype(np.float32)
    want = inference_session(model.SerializeToString()).run(None, {"x": x})[0]
    got = inference_session(rewritten.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attrs,scales", [
    (dict(mode="nearest"), [1, 1, 2, 2]),
    (dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"), [1, 1, 3, 2]),
    (dict(mode="nearest", nearest_mode="round_prefer_ceil"), [1, 1, 3, 3]),
])
def test_nearest_resize_rewrite_is_exact(attrs: dict, scales: list[int]) -> None:
    graph = helper.make_graph([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", **attrs)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array(scales, np.float32), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert make_differentiable(rewritten) == 1
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype(np.float32)
    want = inference_session(model.SerializeToString()).run(None, {"x": x})[0]
    got = inference_session(rewritten.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)


def _resize_model(attrs: dict, scales: list[float] | None, sizes: list[int] | None, opset: int,
                  hw: tuple[int, int] = (5, 4)) -> onnx.ModelProto:
    if opset == 10:
        inputs, rate = ["x", "scales"], numpy_helper.from_array(np.array(scales, np.float32), "scales")
    elif scales is not None:
        inputs, rate = ["x", "", "scales"], numpy_helper.from_array(np.array(scales, np.float32), "scales")
    else:
        inputs, rate = ["x", "", "", "sizes"], numpy_helper.from_array(np.array(sizes, np.int64), "sizes")
    graph = helper.make_graph([helper.make_node("Resize", inputs, ["y"], name="up", **attrs)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, *hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [rate])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize("attrs,scales,sizes,opset,hw", [
    (dict(mode="linear"), [1, 1, 2, 2], None, 13, (5, 4)),
    (dict(mode="linear", coordinate_transformation_mode="align_corners"), None, [2, 3, 9, 7], 13, (5, 4)),
    (dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"), [1, 1, 2, 0.5], None, 13, (5, 4)),
    (dict(mode="cubic"), [1, 1, 1.5, 2.5], None, 13, (5, 4)),
    (dict(mode="linear", antialias=1), [1, 1, 0.5, 0.75], None, 18, (5, 4)),
    (dict(mode="nearest"), [1, 1, 1.5, 0.5], None, 13, (5, 4)),
    (dict(mode="linear"), [1, 1, 2, 3], None, 10, (5, 4)),
    (dict(mode="linear", coordinate_transformation_mode="align_corners"), [1, 1, 0.5, 1.5], None, 13, (70, 33)),
])
def test_interpolating_resize_is_two_matmuls(attrs: dict, scales: list[float] | None, sizes: list[int] | None,
                                             opset: int, hw: tuple[int, int]) -> None:
    """Every separable resize: ``A_h @ x @ A_w`` with matrices read off onnxruntime's own Resize (unit images
    32 at a time: 70 rows take three runs)."""
    model = _resize_model(attrs, scales, sizes, opset, hw)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert make_differentiable(rewritten) == 1
    assert [n.op_type for n in rewritten.graph.node] == ["MatMul", "MatMul"]
    x = np.random.default_rng(1).standard_normal((2, 3, *hw)).astype(np.float32)
    want = inference_session(model.SerializeToString()).run(None, {"x": x})[0]
    got = inference_session(rewritten.SerializeToString()).run(None, {"x": x})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_crop_and_resize_is_left_to_the_builder() -> None:
    model = _resize_model(dict(mode="linear", coordinate_transformation_mode="tf_crop_and_resize"), [1, 1, 2, 2],
                          None, 13)
    assert make_differentiable(model) == 0


def test_linear_resize_trains_and_stays_in_the_output(data: Path, tmp_path: Path) -> None:
    model = OPS_ON_THE_TRAINED_PATH["Resize"]()
    next(n for n in model.graph.node if n.op_type == "Resize").attribute[0].s = b"linear"
    written = _compress(model, data, tmp_path)
    resize = next(n for n in written.graph.node if n.op_type == "Resize")
    assert resize.attribute[0].s == b"linear"


def test_linear_resize_of_a_dynamic_size_trains_at_the_data_size(data: Path, tmp_path: Path) -> None:
    """Height and width unknown in the file: the start check and training both use the data's image size."""
    model = _with_input(_insert_after(build(Quirks(dynamic_hw=True)), "relu1", "Resize", mode="linear"),
                        "relu1_resize", "roi", np.zeros(0, np.float32))
    _with_input(model, "relu1_resize", "scales", np.array([1, 1, 2, 2], np.float32))
    written = _compress(model, data, tmp_path)
    assert "Resize" in {n.op_type for n in written.graph.node}


def test_crop_and_resize_is_refused_at_the_start(data: Path, tmp_path: Path) -> None:
    from impq_onnx.errors import ModelError

    model = OPS_ON_THE_TRAINED_PATH["Resize"]()
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    resize.attribute[0].s = b"linear"
    resize.attribute.append(helper.make_attribute("coordinate_transformation_mode", "tf_crop_and_resize"))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelError, match=r"cannot differentiate node 'relu1_resize' \(Resize\)"):
        compress(path, data, output=tmp_path / "out.onnx", **TINY)


def test_ceil_mode_average_pool_is_left_to_the_builder() -> None:
    graph = helper.make_graph([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
                                                ceil_mode=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 7, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert make_differentiable(model) == 0


@pytest.mark.parametrize("nhwc", [False, True])
def test_compress_trains_through_average_pool(nhwc: bool, data: Path, tmp_path: Path) -> None:
    model = _insert_after(build(Quirks(nhwc=nhwc)), "relu2", "AveragePool", kernel_shape=[2, 2], strides=[2, 2])
    written = _compress(model, data, tmp_path)
    assert "AveragePool" in {n.op_type for n in written.graph.node}  # the output keeps the original op


def test_equal_layer_norm_scales_train(data: Path, tmp_path: Path) -> None:
    """Two LayerNorms over the channels with equal (all-ones) scales, as freshly initialised ConvNeXt blocks."""
    model = build(Quirks(opset=17))
    for i, name in enumerate(["relu1", "relu2"]):
        _insert_after(model, name, "Transpose", perm=[0, 2, 3, 1])
        _insert_after(model, f"{name}_transpose", "LayerNormalization", axis=-1)
        node = next(n for n in model.graph.node if n.name == f"{name}_transpose_layernormalization")
        node.input.extend([f"ln{i}.scale", f"ln{i}.bias"])
        model.graph.initializer.extend([numpy_helper.from_array(np.ones(4, np.float32), f"ln{i}.scale"),
                                        numpy_helper.from_array(np.zeros(4, np.float32), f"ln{i}.bias")])
        _insert_after(model, f"{name}_transpose_layernormalization", "Transpose", perm=[0, 3, 1, 2])
    onnx.checker.check_model(model)
    _compress(model, data, tmp_path)


def test_batch_written_as_minus_one(data: Path, tmp_path: Path) -> None:
    model = build(Quirks())
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = -1
    canonical = from_proto(model)
    assert canonical.input_shape()[0] == "N"
    written = _compress(model, data, tmp_path)
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1  # declared as published


def test_dynamo_allowzero_reshape_frees_the_batch() -> None:
    model = static_batch(1, quirks=Quirks(opset=14))  # allowzero exists from opset 14
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    reshape.attribute.append(helper.make_attribute("allowzero", 1))
    canonical = from_proto(model)
    assert canonical.declared_batch == 1 and canonical.input_shape()[0] == "N"
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    got = inference_session(canonical.to_bytes()).run(None, {canonical.input_name: x})[0]
    session = inference_session(model.SerializeToString())
    want = np.concatenate([session.run(None, {"image": x[i : i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_batch_the_graph_bakes_in_trains_in_chunks(data: Path, tmp_path: Path) -> None:
    """``Reshape(features [1,4] -> [4,1] -> [1,4])``: the batch cannot be freed; every internal batch runs
    in chunks of 1 (fine-tune accumulates their gradients) and the written model verifies."""
    model = batch_baked_into_features()
    assert from_proto(model).declared_batch is None  # stays static
    _compress(model, data, tmp_path)


def test_dynamic_hw_with_max_pool_trains(data: Path, tmp_path: Path) -> None:
    model = _insert_after(build(Quirks(dynamic_hw=True)), "relu1", "MaxPool", kernel_shape=[3, 3], strides=[2, 2],
                          pads=[1, 1, 1, 1])
    _compress(model, data, tmp_path)


@pytest.mark.parametrize("distill", [False, True])
def test_logits_without_a_declared_shape_train(distill: bool) -> None:
    """onnxruntime's loss block read the labels' shape from the logits output: IndexError without one."""
    from impq_onnx.engine.training import fine_tune
    from impq_onnx.frontend.site_analysis import find_sites

    canonical = from_proto(build(Quirks()))
    sites = find_sites(canonical, (1, 3, 8, 8))
    canonical.model.graph.outputs[0].shape = None
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((4, 3, 8, 8)).astype(np.float32), rng.integers(0, 5, 4).astype(np.int64))]
    result = fine_tune(canonical, None, sites, batches, steps=2, lr=0.01, distill=distill, threads=1)
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_npz_data_gives_a_dynamic_model_its_size(layout: str, tmp_path: Path) -> None:
    """A dynamic height/width with .npz data took the ImageNet 224 preset; it takes the arrays' size."""
    from impq_onnx.data.model_data import resolve_preprocess

    images = np.random.default_rng(0).integers(0, 256, (6, 12, 20, 3), dtype=np.uint8)
    if layout == "NCHW":
        images = images.transpose(0, 3, 1, 2)
    np.savez(tmp_path / "data.npz", x=images, y=np.arange(6) % 5)
    canonical = from_proto(build(Quirks(dynamic_hw=True)))
    assert resolve_preprocess(canonical, None, tmp_path / "data.npz").size == (12, 20)
    (tmp_path / "splits").mkdir()
    np.savez(tmp_path / "splits" / "train.npz", x=images, y=np.arange(6) % 5)
    assert resolve_preprocess(canonical, None, str(tmp_path / "splits")).size == (12, 20)


def _with_input(model: onnx.ModelProto, node_name: str, name: str, array: np.ndarray) -> onnx.ModelProto:
    next(n for n in model.graph.node if n.name == node_name).input.append(name)
    model.graph.initializer.append(numpy_helper.from_array(array, name))
    return model


OPS_ON_THE_TRAINED_PATH = {
    "LeakyRelu": lambda: _insert_after(build(Quirks()), "relu1", "LeakyRelu", alpha=0.1),
    "Sigmoid-SiLU": lambda: _insert_after(build(Quirks()), "relu1", "Sigmoid"),
    "Resize": lambda: _with_input(_with_input(_insert_after(build(Quirks()), "relu1", "Resize", mode="nearest"),
                                              "relu1_resize", "roi", np.zeros(0, np.float32)),
                                  "relu1_resize", "scales", np.array([1, 1, 2, 2], np.float32)),
    "Pad": lambda: _with_input(_insert_after(build(Quirks()), "relu1", "Pad", mode="constant"),
                               "relu1_pad", "pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
}


@pytest.mark.parametrize("name", sorted(OPS_ON_THE_TRAINED_PATH))
def test_ops_on_the_trained_path(name: str, data: Path, tmp_path: Path) -> None:
    model = OPS_ON_THE_TRAINED_PATH[name]()
    onnx.checker.check_model(model)
    written = _compress(model, data, tmp_path)
    assert name.split("-")[0] in {n.op_type for n in written.graph.node}

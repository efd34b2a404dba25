"""Issue 24, op coverage on the trained path: MobileNetV3-style HardSigmoid/HardSwish, opset-7 Dropout
(ONNX-zoo SqueezeNet) and PRelu go through compress; the written model keeps the original ops; an op
without a gradient is refused at the start in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from zoo_models import image_folder, with_activation, with_dropout7

from impq_onnx.compression import compress
from impq_onnx.errors import ModelError
from impq_onnx.runtime import inference_session

TINY = dict(steps=2, start_steps=2, sensitivity_samples=16, batch_size=8, max_iterations=1, target_bits=None,
            target_act_bits=None, threads=1, progress=False)

MODELS = {
    "hardsigmoid": lambda: with_activation("HardSigmoid"),
    "hardswish": lambda: with_activation("HardSwish"),
    "prelu": lambda: _prelu(),
    "dropout-opset7": with_dropout7,
}


def _prelu() -> onnx.ModelProto:
    model = with_activation("PRelu")
    for node in model.graph.node:
        if node.op_type == "PRelu":
            node.input.append("slope")
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.full((4, 1, 1), 0.1, np.float32), "slope"))
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_folder(tmp_path_factory.mktemp("zoo") / "data", per_class=6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compress_trains_through_ops_without_native_gradients(name: str, data: Path, tmp_path: Path) -> None:
    model = MODELS[name]()
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    original_ops = {n.op_type for n in model.graph.node} - {"Dropout"}
    out = tmp_path / "out.onnx"
    result = compress(path, data, output=out, **TINY)
    assert result.iterations[-1].fine_tune_steps > 0
    written = onnx.load(out)
    kept = {n.op_type for n in written.graph.node}
    assert original_ops - {"Gemm", "Conv"} <= kept  # HardSwish / HardSigmoid / PRelu stay in the output
    inference_session(written.SerializeToString())


def test_op_without_gradient_is_refused_before_the_run(data: Path, tmp_path: Path) -> None:
    path = tmp_path / "elu.onnx"
    onnx.save(with_activation("Elu"), path)
    with pytest.raises(ModelError, match=r"onnxruntime-training 1.19 cannot differentiate node 'relu1' \(Elu\)"):
        compress(path, data, output=tmp_path / "out.onnx", **TINY)
    assert not (tmp_path / "out.onnx").exists()

"""Issue 24, logits through no-op tails: Identity / Softmax / LogSoftmax in any order, 4-D logits of a
1x1-conv classifier (``[N, C, 1, 1]``, with or without a Squeeze/Flatten), and a second output with a
fixed batch that must not reach the loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from zoo_models import CLASSES, image_folder, with_fixed_batch_output, with_tail

from impq_onnx.compression import compress
from impq_onnx.data.model_data import open_model_data
from impq_onnx.frontend.canonical import from_proto, load
from impq_onnx.runtime import inference_session

X = np.random.default_rng(5).standard_normal((7, 3, 8, 8)).astype(np.float32)

TAILS = {
    "identity": (["Identity"], False, None),
    "softmax-identity": (["Softmax", "Identity"], False, "Softmax"),
    "identity-logsoftmax": (["Identity", "LogSoftmax"], False, "LogSoftmax"),
    "identity-softmax-identity": (["Identity", "Softmax", "Identity"], False, "Softmax"),
    "logits-4d": ([], True, None),
    "logits-4d-flatten": (["Flatten"], True, None),
    "logits-4d-squeeze-softmax": (["Squeeze", "Softmax"], True, "Softmax"),
    "logits-4d-softmax-squeeze": (["Softmax", "Squeeze"], True, "Softmax"),
}


def _raw_logits(model: onnx.ModelProto) -> np.ndarray:
    """The classifier's own output (tensor ``logits``) of the original model, flattened to [N, C]."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.append(onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None))
    session = inference_session(probe.SerializeToString())
    return session.run(None, {"image": X})[0].reshape(len(X), -1)


@pytest.mark.parametrize("name", sorted(TAILS))
def test_logits_are_found_behind_the_tail(name: str) -> None:
    ops, four_d, head = TAILS[name]
    model = with_tail(ops, logits_4d=four_d)
    canonical = from_proto(model)
    assert canonical.head == head
    shape = canonical.model.graph.outputs[0].shape
    assert len(shape) == 2 and shape[1] == CLASSES
    session = inference_session(canonical.to_bytes())
    got = session.run(None, {canonical.input_name: X})[0]
    np.testing.assert_allclose(got, _raw_logits(model), rtol=1e-5, atol=1e-6)


def test_four_d_logits_match_class_folders(tmp_path: Path) -> None:
    path = tmp_path / "conv_head.onnx"
    onnx.save(with_tail([], logits_4d=True), path)
    data = image_folder(tmp_path / "data", per_class=2)
    dataset = open_model_data(load(path), data).train_all  # was "5 class folders, but the model has 1 outputs"
    assert len(dataset.classes) == CLASSES


@pytest.mark.parametrize("name", ["fixed-batch-second-output", "logits-4d"])
def test_compress_trains_on_the_logits_only(name: str, tmp_path: Path) -> None:
    model = with_fixed_batch_output(128) if name == "fixed-batch-second-output" else with_tail([], logits_4d=True)
    assert from_proto(model).model.graph.outputs[0].shape[0] == "N"  # not the second output's 128
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data = image_folder(tmp_path / "data", per_class=6)
    result = compress(path, data, output=tmp_path / "out.onnx", progress=False, steps=2, start_steps=2,
                      sensitivity_samples=16, batch_size=8, max_iterations=1, target_bits=None,
                      target_act_bits=None, threads=1)
    assert result.iterations[-1].fine_tune_steps > 0 and np.isfinite(result.iterations[-1].fine_tune_loss)

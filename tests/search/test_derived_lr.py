"""The learning rate derived from the model (issue 25): IMPQ's default when ``lr`` is not given.

Real onnxruntime-training fine-tunes of tiny CNNs built in code, on the quadrant task (which quarter of
the image is bright) held in memory; ``preprocess="model-input"`` feeds the arrays unchanged, so scaling
them scales the model's gradients.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from quant_models import quadrant_batch, tiny_cnn

from impq_onnx.compression import compress
from impq_onnx.errors import ConfigError
from impq_onnx.search.iteration import LR_PROBE_MIN_STEPS, LR_PROBE_RATES

TINY = dict(preprocess="model-input", phases="weights", max_iterations=0, steps=20, batch_size=16,
            sensitivity_samples=32, target_bits=None, target_act_bits=None, report=False, progress=False)


def _data(scale: float = 1.0) -> dict:
    rng = np.random.default_rng(0)
    (x, y), (xv, yv) = quadrant_batch(160, rng), quadrant_batch(64, rng)
    return {"train": (x * scale, y), "val": (xv * scale, yv)}


def _sharp_cnn() -> onnx.ModelProto:
    """conv3x3(3->6)+Relu -> conv3x3(6->8, stride 2, bias)+Relu -> GlobalAveragePool -> Flatten -> Gemm(8->4),
    no batch-norm: fed inputs 300x larger than it was built for, its gradients are so large that SGD at
    0.005 blows the loss up."""
    rng = np.random.default_rng(0)

    def init(name, *shape, scale=None):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return numpy_helper.from_array((rng.standard_normal(shape) * (scale or np.sqrt(2.0 / fan_in))).astype(
            np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "conv1.w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "conv2.w", "conv2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1],
                              strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "sharp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                              initializer=[init("conv1.w", 6, 3, 3, 3), init("conv2.w", 8, 6, 3, 3),
                                           init("conv2.b", 8, scale=0.1), init("fc.w", 4, 8, scale=0.5),
                                           init("fc.b", 4, scale=0.1)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_the_derived_rate_is_seeded_recorded_and_used_for_the_whole_run(tmp_path):
    runs = [compress(tiny_cnn(0), _data(), output=tmp_path / f"r{i}" / "m.onnx", seed=3,
                     **{**TINY, "max_iterations": 1}) for i in range(2)]
    first = runs[0].iterations
    derived = first[0].extra["lr_derived"]
    assert derived["lr"] in LR_PROBE_RATES and derived["probe_steps"] == max(LR_PROBE_MIN_STEPS, 20 // 4)
    assert [t["lr"] for t in derived["tries"]] == list(LR_PROBE_RATES)
    assert all(t["loss"] is not None and np.isfinite(t["loss"]) for t in derived["tries"])
    # one probe per run: the next iteration fine-tunes at the derived rate without trying again
    assert "lr_derived" not in first[1].extra
    assert first[0].extra["fine_tune_lr"] == first[1].extra["fine_tune_lr"] == derived["lr"]
    # the same seed derives the same rate and writes the same bytes
    again = runs[1].iterations[0].extra["lr_derived"]
    assert again == derived and runs[1].iterations[0].extra["lr_probe_seconds"] > 0
    assert (tmp_path / "r0" / "m.onnx").read_bytes() == (tmp_path / "r1" / "m.onnx").read_bytes()
    # recorded where a rerun reads it: config.yaml and report.json
    config = yaml.safe_load(runs[0].paths["config"].read_text())
    report = json.loads(runs[0].paths["report"].read_text())
    assert config["lr"] == derived["lr"] == report["learning_rate"]["lr"] == report["config"]["lr"]
    assert config["batchnorm"] == "frozen"  # the default, resolved when the run starts
    assert report["learning_rate"]["derived"]["tries"] == json.loads(json.dumps(derived["tries"]))


def test_a_given_lr_is_used_as_is_without_a_probe(tmp_path):
    result = compress(tiny_cnn(0), _data(), output=tmp_path / "m.onnx", seed=3, lr=0.002,
                      **{**TINY, "max_iterations": 1})
    assert all("lr_derived" not in r.extra for r in result.iterations)
    assert [r.extra["fine_tune_lr"] for r in result.iterations] == [0.002, 0.002]
    assert yaml.safe_load(result.paths["config"].read_text())["lr"] == 0.002
    assert json.loads(result.paths["report"].read_text())["learning_rate"] == {"lr": 0.002, "derived": None}


def test_a_model_that_the_old_default_blows_up_derives_a_smaller_rate(tmp_path):
    # Issue 25: models that needed a 10-100x smaller rate than 0.005 to train at all.
    data = _data(scale=300.0)
    fixed = compress(_sharp_cnn(), data, output=tmp_path / "fixed.onnx", lr=0.005, **TINY).iterations[0].extra
    assert fixed["fine_tune_retried"] and fixed["fine_tune_lr"] == 0.0005  # 0.005 raised the loss: retried at /10
    derived = compress(_sharp_cnn(), data, output=tmp_path / "derived.onnx", **TINY).iterations[0].extra
    assert derived["lr_derived"]["lr"] < 0.005
    assert not derived["fine_tune_retried"] and derived["fine_tune_lr"] == derived["lr_derived"]["lr"]
    tries = {t["lr"]: t for t in derived["lr_derived"]["tries"]}
    assert tries[0.005]["loss"] is None or tries[0.005]["loss"] > tries[derived["fine_tune_lr"]]["loss"]


def test_a_work_dir_of_the_old_defaults_resumes_with_them(tmp_path):
    # Written as the version before the derived rate and frozen batch-norm ran (lr 0.005, batchnorm train in
    # run.json): a resume without --lr / --batchnorm continues with them, without probing.
    first = compress(tiny_cnn(0), _data(), output=tmp_path / "m.onnx", lr=0.005, batchnorm="train", **TINY)
    before = (tmp_path / "m.onnx").read_bytes()
    again = compress(tiny_cnn(0), _data(), output=tmp_path / "m.onnx", resume=True, **TINY)
    assert (again.config.lr, again.config.batchnorm) == (0.005, "train")  # the old defaults, as recorded
    assert all("lr_derived" not in r.extra for r in again.iterations)
    assert (tmp_path / "m.onnx").read_bytes() == before
    assert yaml.safe_load(first.paths["config"].read_text())["lr"] == 0.005
    with pytest.raises(ConfigError, match="'lr' was 0.005 and is now 0.001"):
        compress(tiny_cnn(0), _data(), output=tmp_path / "m.onnx", resume=True, lr=0.001, **TINY)

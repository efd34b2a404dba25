"""Issue 24, static batch: a model declaring ``[1, 3, H, W]`` (batch baked into a Reshape) runs at every
internal batch size (evaluate, sensitivity, compress) and the written model keeps the declared batch."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from tiny_models import Quirks, build
from zoo_models import batch_baked_into_features, image_folder, static_batch

from impq_onnx.compression import compress
from impq_onnx.data import open_dataset
from impq_onnx.data.model_data import resolve_preprocess
from impq_onnx.engine import evaluate
from impq_onnx.frontend.canonical import from_proto, load
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.runtime import inference_session
from impq_onnx.sensitivity import noise_gain


def _logits(model: onnx.ModelProto | bytes, x: np.ndarray) -> np.ndarray:
    session = inference_session(model if isinstance(model, bytes) else model.SerializeToString())
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("batch", [1, 2])
def test_static_batch_becomes_dynamic_and_computes_the_same(batch: int) -> None:
    original = static_batch(batch)
    canonical = from_proto(original)
    assert canonical.declared_batch == batch and canonical.input_shape()[0] == "N"
    x = np.random.default_rng(3).standard_normal((6, 3, 8, 8)).astype(np.float32)
    got = _logits(canonical.to_bytes(), x)
    want = np.concatenate([_logits(original, x[i : i + batch]) for i in range(0, 6, batch)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_dynamic_batch_model_is_left_alone() -> None:
    canonical = from_proto(build(Quirks()))
    assert canonical.declared_batch is None and canonical.input_shape()[0] == "N"


def test_batch_baked_where_it_is_not_the_batch_stays_static_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """``Reshape(pool [1,4,1,1] -> [1,4])`` then ``Reshape(-> [4, 1])``: the second bakes the batch into
    axis 1, where copying axis 0 cannot help; the model keeps its static batch and a warning says so."""
    model = batch_baked_into_features()
    with caplog.at_level(logging.WARNING):
        canonical = from_proto(model)
    assert canonical.declared_batch is None and canonical.input_shape()[0] == 1
    assert "batch stays fixed at 1" in caplog.text
    x = np.random.default_rng(4).standard_normal((7, 3, 8, 8)).astype(np.float32)
    labels = np.zeros(7, np.int64)
    result = evaluate(canonical, [(x, labels)], float_model=canonical, threads=1)  # evaluation runs in chunks of 1
    assert result.n == 7 and result.agreement == 1.0
    per_sample = np.concatenate([_logits(model, x[i : i + 1]) for i in range(7)])
    assert result.top1 == np.mean(per_sample.argmax(axis=1) == 0)


def test_evaluate_sensitivity_and_compress_on_a_static_batch_model(tmp_path) -> None:
    path = tmp_path / "static.onnx"
    onnx.save(static_batch(1), path)
    before = path.read_bytes()
    data = image_folder(tmp_path / "data", per_class=8)
    canonical = load(path)
    dataset = open_dataset(data, resolve_preprocess(canonical))
    result = evaluate(canonical, dataset.batches(64), threads=1)  # the internal evaluation batch
    assert result.n == 40 and result.top1 is not None

    sites = find_sites(canonical)
    table = noise_gain(canonical, sites, dataset.batches(32), samples=32, threads=1)
    assert len(table.to_dict()) > 0

    out = tmp_path / "out.onnx"
    compress(path, data, output=out, progress=False, steps=2, start_steps=2, sensitivity_samples=16,
             batch_size=8, max_iterations=1, target_bits=None, target_act_bits=None, threads=1)
    assert path.read_bytes() == before
    written = onnx.load(out)
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # the declared interface
    assert written.graph.output[0].type.tensor_type.shape.dim[0].dim_value == 1
    x, _ = next(dataset.batches(1))
    assert _logits(written, x).shape == (1, 5)


def test_lower_writes_the_declared_batch(tmp_path) -> None:
    from impq_onnx.lowering.lower import lower_file
    from impq_onnx.quant.plan import PrecisionPlan

    path = tmp_path / "static.onnx"
    onnx.save(static_batch(1), path)
    canonical = load(path)
    plan_path = tmp_path / "plan.yaml"
    PrecisionPlan.uniform(find_sites(canonical), 4, None).save(plan_path)
    out = tmp_path / "low.onnx"
    lower_file(path, plan_path, out)
    written = onnx.load(out)
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    x = np.zeros((1, *[d.dim_value for d in written.graph.input[0].type.tensor_type.shape.dim[1:]]), np.float32)
    assert _logits(written, x).shape[0] == 1

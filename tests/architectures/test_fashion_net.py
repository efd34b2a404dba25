"""The bundled Fashion-MNIST CNN: small, valid, and it runs in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from impq_onnx.architectures import fashion_net


def test_fashion_net_is_small_and_valid():
    model = fashion_net()
    onnx.checker.check_model(model, full_check=True)
    params = sum(
        int(np.prod(t.dims))
        for t in model.graph.initializer
        if not t.name.endswith(("running_mean", "running_var"))
    )
    assert params < 100_000
    names = [n.name for n in model.graph.node]
    assert len(names) == len(set(names))
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 4
    assert model.graph.output[0].name == "logits"


def test_fashion_net_runs_in_onnxruntime():
    session = ort.InferenceSession(fashion_net().SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    (logits,) = session.run(["logits"], {"input": x})
    assert logits.shape == (3, 10) and np.isfinite(logits).all()


def test_fashion_net_is_deterministic():
    assert fashion_net(seed=1).SerializeToString() == fashion_net(seed=1).SerializeToString()

"""MobileNet v1 for CIFAR: depthwise convs as grouped Conv nodes, width multiplier, runs in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from impq_onnx.architectures import mobilenet_v1_cifar


def test_mobilenet_has_the_published_size(count_trainable_params, count_macs):
    model = mobilenet_v1_cifar()
    onnx.checker.check_model(model, full_check=True)
    assert count_trainable_params(model) == 3_217_226  # the usual CIFAR MobileNet: 3.2 M
    assert 46e6 < count_macs(model) < 48e6
    smaller = mobilenet_v1_cifar(width=0.5)
    assert count_trainable_params(smaller) < count_trainable_params(model) / 3


def test_depthwise_convs_are_grouped_per_channel():
    model = mobilenet_v1_cifar(width=0.25)
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    depthwise = [n for n in model.graph.node if n.name.endswith(".dw")]
    assert len(depthwise) == 13
    for node in depthwise:
        group = next(a.i for a in node.attribute if a.name == "group")
        weight = inits[node.input[1]]
        assert group == weight[0] and weight[1:] == [1, 3, 3]


def test_mobilenet_runs_in_onnxruntime():
    model = mobilenet_v1_cifar(num_classes=7, width=0.25)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    (logits,) = session.run(["logits"], {"input": x})
    assert logits.shape == (2, 7) and np.isfinite(logits).all()


def test_width_must_be_positive():
    with pytest.raises(ValueError, match="width"):
        mobilenet_v1_cifar(width=0)

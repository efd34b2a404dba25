"""A ReLU6 (Clip 0..6) between a batch-norm and an activation site caps the site's clip at 6."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from impq_onnx.architectures.layers import NetworkWriter
from impq_onnx.frontend.canonical import from_proto
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.quant.plan import PrecisionPlan


def _net(upper: float | None) -> onnx.ModelProto:
    net = NetworkWriter(0)
    x = net.batch_norm("bn1", net.conv("conv1", "input", 3, 4), 4)
    if upper is None:
        x = net.relu("act1", x)
    else:
        x = net._node("Clip", "act1", [x, net._constant("act1.lo", np.float32(0.0)),
                                       net._constant("act1.hi", np.float32(upper))])
    x = net.flatten("flatten", net.global_avg_pool("pool", net.conv("conv2", x, 4, 4)))
    net.gemm("fc", x, 4, 3, output="logits")
    model = net.model("relu6", "input", ("N", 3, 8, 8), "logits", ("N", 3))
    for t in model.graph.initializer:  # beta 10: the batch-norm's clip max(beta + 6|gamma|) is 16
        if t.name == "bn1.bias":
            t.CopyFrom(onnx.numpy_helper.from_array(np.full(4, 10.0, np.float32), t.name))
    return model


@pytest.mark.parametrize("upper, clip", [(6.0, 6.0), (None, 16.0), (40.0, 16.0)])
def test_clip_after_batchnorm_caps_the_activation_clip(upper, clip):
    canonical = from_proto(_net(upper))
    sites = find_sites(canonical, (1, 3, 8, 8))
    site = next(s for s in sites.activations if "conv2" in s.layers)
    assert site.batchnorm is not None and site.unsigned
    assert site.batchnorm.clip == pytest.approx(clip)
    plan = PrecisionPlan.uniform(sites, 8, 8)
    assert plan.clips[site.tensor].value == pytest.approx(clip)

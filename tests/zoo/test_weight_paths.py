"""Issue 24, weights reached through constant-foldable paths (CNTK's ``Reshape(initializer)``, Transpose,
Cast, Identity, Constant nodes) are found as layer weights; a layer whose weight the graph computes
stays float, is named in a warning and counts 32 bits in B_w,eff and CR."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from zoo_models import with_folded_fc_weight

from impq_onnx.frontend.canonical import from_proto
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.runtime import inference_session

X = np.random.default_rng(2).standard_normal((4, 3, 8, 8)).astype(np.float32)
CONV_PARAMS = 4 * 3 * 9 + 4 * 9
FC_PARAMS = 5 * 4


def _logits(data: bytes) -> np.ndarray:
    session = inference_session(data)
    return session.run(None, {session.get_inputs()[0].name: X})[0]


@pytest.mark.parametrize("path", ["reshape", "transpose", "cast", "identity", "constant"])
def test_weight_behind_a_foldable_path_is_a_layer_weight(path: str) -> None:
    model = with_folded_fc_weight(path)
    canonical = from_proto(model)
    sites = find_sites(canonical)
    fc = sites.layer("fc")
    assert fc.weight_shape == (5, 4) and fc.kernels == 5 and not sites.float_layers
    assert sum(layer.params for layer in sites.layers) == CONV_PARAMS + FC_PARAMS
    np.testing.assert_allclose(_logits(canonical.to_bytes()), _logits(model.SerializeToString()), rtol=1e-6, atol=1e-6)
    plan = PrecisionPlan.uniform(sites, 4, None)
    assert plan.weight_bits_effective(sites) == 4.0


def test_computed_weight_stays_float_named_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        sites = find_sites(from_proto(with_folded_fc_weight("computed")))
    assert [layer.node for layer in sites.layers] == ["conv1", "dwconv"]
    assert [(f.node, f.op_type, f.params) for f in sites.float_layers] == [("fc", "Gemm", FC_PARAMS)]
    assert "'fc' (Gemm) keep float weights" in caplog.text
    plan = PrecisionPlan.uniform(sites, 4, None)
    expected = (4 * CONV_PARAMS + 32 * FC_PARAMS) / (CONV_PARAMS + FC_PARAMS)
    assert plan.weight_bits_effective(sites) == pytest.approx(expected)
    assert plan.compression_ratio(sites) == pytest.approx(16 / expected)
    assert plan.weight_bytes(sites) == pytest.approx(CONV_PARAMS * 4 / 8 + FC_PARAMS * 4)

"""Issue 20 on the zoo: every exported classifier lowered to the onnxruntime deployment profile (``--format ort``)
verifies, also as deployed: onnxruntime with every graph optimization fuses its integer kernels, and the logits
equal the integer reference of those kernels to the bit. Where onnxruntime fuses a kind the reference does not
write out (MatMulIntegerToFloat in ConvNeXt's and ViT's linear layers), the comparison is reported as not
covered and must still not fail."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from test_zoo_matrix import MATRIX
from zoo_inputs import class_images, input_size

from impq_onnx.data.model_data import open_model_data
from impq_onnx.frontend.canonical import load
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.lowering.lower import lower
from impq_onnx.lowering.targets.ort_integer import REWRITTEN
from impq_onnx.lowering.targets.ort_kernels import u8s8_kernels
from impq_onnx.lowering.verify import verify
from impq_onnx.quant.plan import PrecisionPlan


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in MATRIX])
def test_zoo_model_deploys_exactly_in_onnxruntime(path: Path, tmp_path: Path) -> None:
    h, w, _ = input_size(onnx.load(str(path)), dynamic=(32, 40))
    canonical = load(path)
    data = open_model_data(canonical, class_images(tmp_path / "images", h, w, per_class=1), None).evaluation
    sites = find_sites(canonical, (1, *data.sample_shape))
    plan = PrecisionPlan.uniform(sites, 4, 8, weight_scheme="symmetric-rms", default_clip=4.0).validate(sites)
    result = verify(lower(canonical, plan, sites, format="ort"), canonical, plan, sites, data.batches(10))
    assert result.ok and result.max_logit_diff == 0.0, result.to_dict()
    assert result.deployed_max_logit_diff == 0.0 and result.deployed_agreement == 1.0, result.to_dict()
    assert sum(result.fused_kernels.values()) > 0 or path.stem == "handmade_tf2onnx_nhwc_avgpool"
    # covered: every fused kind is written out, on x86-64 with AVX2; 4-bit weight codes cannot saturate the int16
    # pair sums of the kernels without VNNI (ort_kernels.pair_overflow), so VNNI or not makes no difference
    assert result.deployed_covered == (set(result.fused_kernels) <= set(REWRITTEN) and u8s8_kernels() is not None), \
        (result.fused_kernels, result.deployed_note)

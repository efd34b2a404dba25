"""QDQ target (the default): standard QuantizeLinear / DequantizeLinear, runnable by any ONNX runtime.

The lowering passes already produce this form; the target only moves each quantized Conv's float bias
into an ``Add`` (:class:`~impq_onnx.lowering.passes.split_conv_bias.SplitConvBiasPass`, which says why).
Weights are stored as integer codes; an activation's integer range is its QuantizeLinear output type,
narrowed by the Clip in front of it when ``B`` is below the type's width.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from impq_onnx.frontend.sites import SiteTable
from impq_onnx.lowering.passes.split_conv_bias import SplitConvBiasPass
from impq_onnx.lowering.targets.base import Array, Lowered, Target
from impq_onnx.quant.plan import PrecisionPlan

__all__ = ["QdqTarget"]


class QdqTarget(Target):
    name = "qdq"
    help = "standard QuantizeLinear/DequantizeLinear"
    stores_codes = True

    def rewrite(self, model: ir.Model, plan: PrecisionPlan | None, sites: SiteTable | None,
                **options: object) -> dict[str, dict | bytes]:
        if plan is not None and sites is not None:
            SplitConvBiasPass(plan, sites)(model)
        return {}

    def activation_range(self, lowered: Lowered, site: str, entry: dict,
                         array: Array) -> tuple[int, int, float] | None:
        graph = lowered.proto.graph
        producer = next((n for n in graph.node if entry["tensor"] in n.output), None)
        if producer is None:
            return None
        scale = float(array(producer.input[1]).reshape(()))
        zero = array(producer.input[2])
        info, offset = np.iinfo(zero.dtype), int(zero.reshape(-1)[0])
        lo, hi = int(info.min) - offset, int(info.max) - offset  # codes less the zero point
        clip = next((n for n in graph.node if producer.input[0] in n.output and n.op_type == "Clip"), None)
        if clip is not None:
            lo = max(lo, int(np.rint(array(clip.input[1]) / np.float32(scale))))
            hi = min(hi, int(np.rint(array(clip.input[2]) / np.float32(scale))))
        return lo, hi, scale

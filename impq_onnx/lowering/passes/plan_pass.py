"""The base of the lowering passes: a pass configured by a precision plan and its site table.

Both are read only; a pass holds no other state between runs, so running it twice on the same model
changes nothing the second time.
"""

from __future__ import annotations

import onnx_ir as ir

from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.frontend.sites import SiteTable

__all__ = ["PlanPass"]


class PlanPass(ir.passes.InPlacePass):
    def __init__(self, plan: PrecisionPlan, sites: SiteTable):
        super().__init__()
        self.plan = plan
        self.sites = sites

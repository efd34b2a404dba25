"""Stage 2, quant: the precision plan, the quantizers, and the fake-quant simulation of a plan.

:mod:`.plan` holds the bits of every group (the one object search changes and lowering reads);
:mod:`.schemes` the weight schemes (a registry, one module each); :mod:`.quantizers` the
activation quantizer and the ONNX building blocks; :mod:`.simulate` builds the simulated
model that training, sensitivity and verification run.
"""

from __future__ import annotations

from impq_onnx.quant.plan import ActivationClip, PrecisionPlan
from impq_onnx.quant.simulate import calibrate_clips, simulate

__all__ = ["PrecisionPlan", "ActivationClip", "simulate", "calibrate_clips"]

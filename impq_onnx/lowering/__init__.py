"""Stage 6, lowering: plan + canonical model -> the deployable model, and the proof that it is right.

:mod:`.lower` runs the passes (:mod:`.passes`) and the output targets (:mod:`.targets`); :mod:`.verify`
checks the written model against the simulation.
"""

from __future__ import annotations

from impq_onnx.lowering.lower import lower, lower_file, target_names, write
from impq_onnx.lowering.verify import VerifyResult, verify

__all__ = ["lower", "lower_file", "write", "target_names", "verify", "VerifyResult"]

"""Everything that runs on onnxruntime: fine-tuning (onnxruntime-training) and evaluation.

onnxruntime-training specifics stay behind this package; the rest of the tool sees plain functions.
"""

from __future__ import annotations

from impq_onnx.engine.batchnorm import batchnorm_statistics, recompute_batchnorm
from impq_onnx.engine.evaluation import EvalResult, evaluate, predict_logits
from impq_onnx.engine.schedule import warmup_cosine, warmup_exponential
from impq_onnx.engine.training import OPTIMIZERS, FineTuneDiverged, TrainedWeights, fine_tune

__all__ = ["fine_tune", "FineTuneDiverged", "TrainedWeights", "OPTIMIZERS", "evaluate", "EvalResult", "predict_logits", "batchnorm_statistics", "recompute_batchnorm", "warmup_cosine", "warmup_exponential"]

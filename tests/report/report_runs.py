"""What the report tests share: the bundled model and data, the tiny compress budget, the figure names."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "fashion-mnist" / "model.onnx"
DATA = ROOT / "models" / "fashion-mnist"
needs_model = pytest.mark.skipif(not MODEL.is_file(), reason="the bundled Fashion-MNIST model is not built yet")
TINY = dict(steps=3, start_steps=6, sensitivity_samples=32, max_val_samples=40, batch_size=16, max_iterations=2,
            target_bits=None, target_act_bits=None)
RUN_FIGURES = ("bits_per_layer", "accuracy_vs_bits", "accuracy_drop", "sensitivity", "kernel_bits")

"""compress from Python, as a pipeline calls it: an in-memory ONNX model and numpy arrays, no files read.

Run from the repository root (``python docs/examples/pipeline.py [OUTPUT_DIR]``). The model and the
images come from the bundled Fashion-MNIST demo (``impq_onnx/demo_data``), loaded with ``onnx.load`` and
decoded to arrays with Pillow, as a pipeline holding its own model and data would have them. Nothing is
printed by the library: the ``progress`` callback below is the only output, and it is optional.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

import impq_onnx

DEMO = Path(impq_onnx.__file__).parent / "demo_data"


def decode(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 28, 28] uint8, labels [N])`` from an ImageFolder tree (class folders in label order)."""
    images, labels = [], []
    for label, class_dir in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        for path in sorted(class_dir.glob("*.png")):
            images.append(np.asarray(Image.open(path).convert("L")))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def run(output_dir: Path, progress=None) -> impq_onnx.CompressResult:
    model = onnx.load(DEMO / "model.onnx")  # an in-memory onnx.ModelProto
    train, test = decode(DEMO / "train"), decode(DEMO / "test")
    return impq_onnx.compress(
        model,
        {"train": train, "test": test},  # or just `train`: a validation part is held out of it either way
        output=output_dir / "model.impq.onnx",
        target_bits=5.0,  # end the weight phase at B_w,eff <= 5
        target_act_bits=6.0,
        steps=10, start_steps=20, sensitivity_samples=64, max_val_samples=100,  # a quick run
        progress=progress,
    )


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="impq-pipeline-"))
    result = run(out, progress=lambda event: print(event, file=sys.stderr))
    final = result.final
    print(f"{result.stop_reason}: B_w,eff {final['weight_bits_effective']:.2f}, "
          f"B_a,eff {final['activation_bits_effective']:.2f}, test top-1 {final['test_top1']:.3f} "
          f"(float {result.reference['test_top1']:.3f}) -> {result.paths['output']}")

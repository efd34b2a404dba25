"""What the zoo matrix (``tests/zoo/test_zoo_matrix.py``) and its bench (``bench/zoo.py``) feed a zoo model:
its image size and layout, and a folder of random PNG images in class folders. numpy, PIL and onnx only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from PIL import Image

__all__ = ["CLASSES", "input_size", "class_images"]

CLASSES = 10


def input_size(model: onnx.ModelProto, dynamic: tuple[int, int]) -> tuple[int, int, str]:
    """Image height, width (``dynamic`` where the model's are dynamic) and layout (NCHW / NHWC) of its input."""
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in model.graph.input[0].type.tensor_type.shape.dim]
    nhwc = dims[3] in (1, 3) and dims[1] not in (1, 3)
    h, w = (dims[1], dims[2]) if nhwc else (dims[2], dims[3])
    return h or dynamic[0], w or dynamic[1], "NHWC" if nhwc else "NCHW"


def class_images(root: Path, h: int, w: int, per_class: int) -> Path:
    """``root/classNN/i.png``: ``per_class`` seeded random RGB images of ``h`` x ``w`` for each of ``CLASSES``."""
    rng = np.random.default_rng(7)
    for c in range(CLASSES):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c:02d}" / f"{i}.png")
    return root

"""The field bench's onnxruntime column: ``quantize_static`` (W8A8) on the same model, images and split.

    python bench/field_static.py MODEL.onnx DATA_ROOT PREPROCESS.yaml OUT_DIR [--labelled] [--mainline PY]

Used by ``bench/field.py`` (run ``ort-static``); runnable alone on one model. The images go through
impq-onnx's own preprocessing (the same arrays its ``evaluate`` and ``compress`` see: ``train/`` calibrates,
``test/`` measures), saved as ``OUT_DIR/arrays.npz``; then, in the mainline onnxruntime venv (onnxruntime's
quantization tools need a newer onnx than the training build), ``quant_pre_process`` (skipped with a note when
it fails on the model) and ``quantize_static`` (QDQ, per channel, uint8 activations, int8 weights: the
configuration ``bench/deploy.py`` compares against), and top-1 / agreement with the float model on ``test/``
in that runtime. Prints one JSON line: ``{"top1", "agreement", "n", "note", "onnxruntime"}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy import ensure_venv  # noqa: E402 - the mainline venv deploy.py makes, shared

# Runs in the mainline venv: argv = model, arrays.npz, out_dir, labelled (0/1).
CHILD = r"""
import json, sys
import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
model, arrays, out, labelled = sys.argv[1], np.load(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
proto = onnx.load(model)
inp = proto.graph.input[0]
dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
static_batch = [d.dim_value for d in inp.type.tensor_type.shape.dim][:1] == [1]
step = 1 if static_batch else 32
calib = arrays["calib"].astype(dtype)
class Reader(CalibrationDataReader):
    def __init__(self):
        self.items = iter([{inp.name: calib[i:i + step]} for i in range(0, len(calib), step)])
    def get_next(self):
        return next(self.items, None)
note = []
source = model
try:
    quant_pre_process(model, f"{out}/pre.onnx")
    source = f"{out}/pre.onnx"
except Exception as exc:
    note.append(f"quant_pre_process failed ({type(exc).__name__}), quantized as published")
quantize_static(source, f"{out}/static.onnx", Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
def logits(path):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = arrays["test"].astype(dtype)
    return np.concatenate([s.run(None, {inp.name: x[i:i + step]})[0].reshape(len(x[i:i + step]), -1)
                           for i in range(0, len(x), step)]).astype(np.float32)
ref, got = logits(model), logits(f"{out}/static.onnx")
agreement = float(np.mean(ref.argmax(1) == got.argmax(1)))
top1 = float(np.mean(got.argmax(1) == arrays["labels"])) if labelled else None
print(json.dumps({"top1": top1, "agreement": agreement, "n": len(ref), "note": "; ".join(note),
                  "onnxruntime": ort.__version__}))
"""


def export_arrays(model: Path, data: Path, preprocess: Path, out: Path, max_calib: int = 256) -> Path:
    """``out/arrays.npz``: ``calib`` (``train/``, at most ``max_calib`` images), ``test`` and its ``labels``, as
    impq-onnx preprocesses them for ``model`` (the model's own input layout)."""
    from impq_onnx.api import _data, load

    canonical = load(str(model))
    opened = _data(canonical, str(data), str(preprocess))

    def arrays(dataset, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        xs, ys, seen = [], [], 0
        for x, y in dataset.batches(64):
            xs.append(np.asarray(x, np.float32))
            ys.append(np.asarray(y if y is not None else np.full(len(x), -1), np.int64))
            seen += len(x)
            if limit is not None and seen >= limit:
                break
        x, y = np.concatenate(xs), np.concatenate(ys)
        return (x[:limit], y[:limit]) if limit is not None else (x, y)

    calib, _ = arrays(opened.train_all, max_calib)
    test, labels = arrays(opened.evaluation, None)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "arrays.npz"
    np.savez(path, calib=calib, test=test, labels=labels)
    return path


def run(model: Path, data: Path, preprocess: Path, out: Path, labelled: bool, python: Path | None = None) -> dict:
    """The quantize_static row for one model (see the module docstring)."""
    arrays = export_arrays(model, data, preprocess, out)
    python = python or ensure_venv()
    done = subprocess.run([str(python), "-c", CHILD, str(model), str(arrays), str(out), "1" if labelled else "0"],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()] or ["(no output)"]
        raise RuntimeError(f"quantize_static: {lines[-1][:300]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("preprocess", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--labelled", action="store_true")
    ap.add_argument("--mainline", type=Path, default=None, help="python of a venv with mainline onnxruntime")
    args = ap.parse_args()
    print(json.dumps(run(args.model, args.data, args.preprocess, args.out, args.labelled, args.mainline)))


if __name__ == "__main__":
    main()

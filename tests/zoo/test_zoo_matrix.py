"""Issue 24, the zoo matrix: every committed exported classifier goes through as published.

Each model of ``models/zoo/manifest.json`` (torchvision architectures exported by torch.onnx TorchScript and
dynamo, plus files in the style of tf2onnx, paddle2onnx and onnx-caffe2 written by ``models/zoo/make_zoo.py``)
and the real tf2onnx / paddle2onnx files of ``tests/models/exported`` runs, unmodified, through the CLI on a
folder of PNG images decoded from disk:

- every model, in CI: ``inspect`` -> the trained path is checked (every op differentiable after the rewrites)
  -> ``lower`` a uniform W4A8 plan -> ``verify`` (the written model in onnxruntime gives the simulation's
  activation codes and logits exactly, so the same top-1) -> interface check (input/output names, element
  types, declared shapes unchanged) -> the written model runs as published, here and in the newest mainline
  onnxruntime (a throwaway venv; all graph optimizations on: the top-1 of every output equals this runtime's);
- ``compress`` W4A8 with a tiny budget (fine-tune, sensitivity, calibration at the model's batch and size) ->
  ``verify`` -> interface -> runs: two small models in CI, the whole matrix with ``-m slow``
  (``bench/zoo.py`` times it at the bench sizes).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from consumer_venvs import consumer_venv
from zoo_inputs import CLASSES, class_images, input_size

from impq_onnx.cli import main
from impq_onnx.frontend.interface import interface_of
from impq_onnx.runtime import inference_session

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "models" / "zoo"
EXPORTED = ROOT / "tests" / "models" / "exported"

# The real exporters' files that complete the matrix (tf2onnx NHWC Keras CNN, paddle2onnx MobileNetV3).
REAL = ["tf2onnx_keras_cnn_opset13.onnx", "paddle2onnx_mobilenetv3_opset13.onnx"]
# compress in CI (the rest is marked slow: about 15-60 s each on two loaded cores)
QUICK_COMPRESS = {"handmade_caffe2_opset8", "handmade_paddle_batch_minus1"}


def _matrix() -> list[Path]:
    manifest = json.loads((ZOO / "manifest.json").read_text())
    return sorted(ZOO / entry["file"] for entry in manifest.values()) + [EXPORTED / name for name in REAL]


MATRIX = _matrix()


def test_the_matrix_covers_the_issue() -> None:
    manifest = json.loads((ZOO / "manifest.json").read_text())
    architectures = {entry["architecture"] for entry in manifest.values()}
    assert len(architectures) + len(REAL) >= 15
    variants = {entry["variant"] for entry in manifest.values()}
    assert {"static1", "dynhw", "fp16", "nhwc", "old-opset"} <= variants
    exporters = {entry["exporter"] for entry in manifest.values()}
    assert {"torch.onnx torchscript", "torch.onnx dynamo"} <= exporters
    assert all(entry["size_bytes"] <= 2_000_000 for entry in manifest.values())
    for path in MATRIX:
        assert path.stat().st_size <= 2_000_000, path


def _invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, result.output


def _verified(out_model: Path, float_model: Path, plan: Path, data: Path) -> None:
    code, out = _invoke(["verify", str(out_model), "--model", str(float_model), "--plan", str(plan),
                         "--data", str(data), "--json", "--threads", "1"])
    assert code == 0, out
    checked = json.loads(out[out.index("{"):])
    # exact: both run as written, so every activation code and logit equals the simulation's (no rounding tie flips)
    assert checked["agreement"] == 1.0 and checked["max_logit_diff"] == 0.0 and checked["tie_flips"] == 0, checked
    assert checked["samples"] == CLASSES * 2, checked


def _params(compress: bool) -> list:
    params = []
    for path in MATRIX:
        marks = []
        if compress and path.stem not in QUICK_COMPRESS:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(path, id=path.stem, marks=marks))
    return params


# Runs in the mainline venv: the written model on the saved input, every output's top-1 against the saved ones.
MAINLINE = r"""
import sys
import numpy as np
import onnxruntime as ort
model, saved = sys.argv[1], np.load(sys.argv[2])
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
outs = session.run(None, {session.get_inputs()[0].name: saved["x"]})
for i, out in enumerate(outs):
    ref = saved[f"out{i}"]
    assert out.dtype == ref.dtype and out.shape == ref.shape, (i, out.dtype, ref.dtype, out.shape, ref.shape)
    a, b = out.astype(np.float32).reshape(len(out), -1), ref.astype(np.float32).reshape(len(ref), -1)
    assert np.isfinite(a).all() and (a.argmax(1) == b.argmax(1)).all(), (i, a.argmax(1), b.argmax(1))
print(ort.__version__)
"""


@pytest.fixture(scope="module")
def mainline_python() -> Path:
    return consumer_venv("ort-mainline", ["onnxruntime", "numpy"])


@pytest.mark.parametrize("path", _params(compress=False))
def test_zoo_model_lowers_w4a8_as_published(path: Path, tmp_path: Path, mainline_python: Path) -> None:
    from impq_onnx.engine.differentiable import check_trainable
    from impq_onnx.frontend.canonical import load
    from impq_onnx.frontend.site_analysis import find_sites
    from impq_onnx.quant.plan import PrecisionPlan

    original_bytes = path.read_bytes()
    original = onnx.load(str(path))
    h, w, layout = input_size(original, dynamic=(32, 40))  # small where the model's size is dynamic
    data = class_images(tmp_path / "images", h, w, per_class=2)
    code, out = _invoke(["inspect", str(path), "--json"])
    assert code == 0, out
    canonical = load(path)
    check_trainable(canonical)  # every op on the trained path has a gradient (after the exact rewrites)
    sites = find_sites(canonical, (1, 3, h, w) if layout == "NCHW" else None)
    plan_path, out_model = tmp_path / "plan.yaml", tmp_path / "out.onnx"
    PrecisionPlan.uniform(sites, 4, 8, default_clip=4.0).save(plan_path)
    code, out = _invoke(["lower", str(path), "--plan", str(plan_path), "-o", str(out_model)])
    assert code == 0, out
    assert path.read_bytes() == original_bytes
    _verified(out_model, path, plan_path, data)
    x, outputs = _runs_as_published(out_model, original, original_bytes, h, w, layout)
    np.savez(tmp_path / "saved.npz", x=x, **{f"out{i}": out for i, out in enumerate(outputs)})
    done = subprocess.run([str(mainline_python), "-c", MAINLINE, str(out_model), str(tmp_path / "saved.npz")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("path", _params(compress=True))
def test_zoo_model_compresses_as_published(path: Path, tmp_path: Path) -> None:
    original_bytes = path.read_bytes()
    original = onnx.load(str(path))
    h, w, layout = input_size(original, dynamic=(32, 40))  # small where the model's size is dynamic
    data = class_images(tmp_path / "images", h, w, per_class=2)
    out_model = tmp_path / "out" / f"{path.stem}.w4a8.onnx"
    code, out = _invoke([
        "compress", str(path), "--data", str(data), "--output", str(out_model), "--quiet", "--no-report",
        "--start-bits", "4", "--target-bits", "4", "--start-act-bits", "8", "--target-act-bits", "8",
        "--max-iterations", "1", "--steps", "1", "--start-steps", "1", "--batch-size", "4", "--lr", "0.0001",
        "--sensitivity-samples", "4", "--val-fraction", "0", "--threads", "1"])
    assert code == 0, out
    assert path.read_bytes() == original_bytes  # the input is never written
    _verified(out_model, out_model.with_name(f"{path.stem}.w4a8.float.onnx"),
              out_model.with_name(f"{path.stem}.w4a8.plan.yaml"), data)
    _runs_as_published(out_model, original, original_bytes, h, w, layout)


def _runs_as_published(out_model: Path, original: onnx.ModelProto, original_bytes: bytes, h: int, w: int,
                       layout: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """The written model's input and outputs here, after checking them against the original's."""
    written = onnx.load(str(out_model))
    assert interface_of(written) == interface_of(original)
    ops = {node.op_type for node in written.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops

    # The written model runs as published: same output names, element types and ranks as the original.
    x_info = original.graph.input[0]
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in
             x_info.type.tensor_type.shape.dim]
    if not all(d.HasField("dim_value") and d.dim_value > 0 for d in x_info.type.tensor_type.shape.dim[1:]):
        shape = [shape[0], h, w, 3] if layout == "NHWC" else [shape[0], 3, h, w]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(x_info.type.tensor_type.elem_type)
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    ours = inference_session(written.SerializeToString()).run(None, {x_info.name: x})
    theirs = inference_session(original_bytes).run(None, {x_info.name: x})
    assert [(a.dtype, a.ndim) for a in ours] == [(b.dtype, b.ndim) for b in theirs]
    assert all(np.isfinite(a.astype(np.float32)).all() for a in ours)
    return x, ours

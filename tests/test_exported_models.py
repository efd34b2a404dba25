"""Real exported classifiers (PyTorch TorchScript and dynamo, tf2onnx, paddle2onnx; see
models/exporters/README.md): each loads, canonicalises and inspects, its site table counts the
layers the exporter wrote, and the canonical model reproduces the framework's own outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import impq_onnx
from impq_onnx.runtime import inference_session

FOLDER = Path(__file__).parent / "models" / "exported"
MANIFEST = json.loads((FOLDER / "manifest.json").read_text())
ENTRIES = {entry["file"]: entry for entry in MANIFEST}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_manifest_covers_the_mainstream_exporters():
    exporters = {entry["exporter"].split()[0] for entry in MANIFEST}
    assert {"torch", "tf2onnx", "paddle2onnx"} <= {e.split(".")[0] for e in exporters}


@pytest.mark.parametrize("file", sorted(ENTRIES))
def test_exported_model_loads_and_reproduces_the_framework(file):
    entry = ENTRIES[file]
    canonical = impq_onnx.load(FOLDER / file, output=entry["logits_output"])
    assert canonical.input_layout == entry["layout"]
    table = impq_onnx.find_sites(canonical)
    convs = sum(layer.op_type == "Conv" for layer in table.layers)
    linear = sum(layer.op_type in ("Gemm", "MatMul") for layer in table.layers)
    assert (convs, linear) == (entry["conv_const_weight_layers"], entry["gemm_or_matmul_layers"])
    assert table.total_macs > 0 and all(layer.kernels > 0 for layer in table.layers)

    if not entry.get("reference_io"):
        return
    ref = np.load(FOLDER / entry["reference_io"])
    x = ref["input"].astype(np.float32)
    logits = inference_session(canonical.to_bytes()).run(None, {canonical.input_name: x})[0]
    position = entry["outputs"].index(entry["logits_output"]) if entry["logits_output"] else 0
    expected = ref[f"output_{position}"].astype(np.float32)
    got = _softmax(logits) if canonical.head == "Softmax" else logits
    fp16 = entry["input_dtype"] == "float16"
    # float16 exports: the framework computed in float16, the canonical model in float32
    tolerance = 1e-2 if fp16 else 1e-4
    assert np.max(np.abs(got - expected)) <= tolerance * max(1.0, float(np.max(np.abs(expected))))
    assert np.array_equal(got.argmax(1), expected.argmax(1)) or fp16


def test_inspect_runs_on_every_exported_model():
    for file, entry in sorted(ENTRIES.items()):
        args = [sys.executable, "-m", "impq_onnx", "inspect", str(FOLDER / file), "--json"]
        if entry["logits_output"]:
            args += ["--output", entry["logits_output"]]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{file}: {result.stderr}"
        assert json.loads(result.stdout)["totals"]["layers"] >= 4

"""qonnx 1.0.0 (in its own /tmp venv) cleans up, infers datatypes for and executes the QONNX file that
``impq-onnx lower --format qonnx --static-batch 1`` writes, with per-kernel bits, equal to the simulation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from consumer_venvs import ROOT, consumer_venv
from lowering_cases import mixed_plan

from impq_onnx.data.model_data import open_model_data
from impq_onnx.frontend.canonical import load
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.lowering.lower import lower
from impq_onnx.lowering.verify import verify
from impq_onnx.quant.simulate import simulate
from impq_onnx.runtime import inference_session

MODEL = ROOT / "models" / "fashion-mnist" / "model.onnx"
CHECK = ROOT / "tests" / "lowering" / "targets" / "qonnx_check.py"


@pytest.fixture(scope="module")
def qonnx_python():
    return consumer_venv("qonnx", ["qonnx==1.0.0"])


@pytest.mark.parametrize("scheme", ["midrise-max", "symmetric-rms"])
def test_qonnx_executes_the_cli_output_equal_to_the_simulation(qonnx_python, tmp_path, scheme):
    canonical = load(MODEL)
    sites = find_sites(canonical)
    plan = mixed_plan(sites, scheme, float_kernel=False)  # per-kernel bits 1..8 in every layer
    plan.save(tmp_path / "plan.yaml")
    out = tmp_path / "model.qonnx.onnx"
    done = subprocess.run([sys.executable, "-m", "impq_onnx", "lower", str(MODEL), "--plan",
                           str(tmp_path / "plan.yaml"), "-o", str(out), "--format", "qonnx", "--static-batch", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim][0] == 1
    x = np.concatenate([b[0] for b in open_model_data(canonical, MODEL.parent / "test", None,
                                                      limit_per_class=1).train_all.batches(10)])
    qdq = lower(canonical, plan, sites)
    assert verify(qdq, canonical, plan, sites, [x]).ok  # the reference equals the simulation here
    onnx.save(qdq.proto, tmp_path / "reference.onnx")
    session = inference_session(simulate(canonical, plan, sites).SerializeToString())
    logits = np.concatenate([session.run(None, {canonical.input_name: x[i:i + 1]})[0] for i in range(len(x))])
    np.savez(tmp_path / "data.npz", x=x, logits=logits)
    done = subprocess.run([str(qonnx_python), str(CHECK), str(out), str(tmp_path / "data.npz"),
                           str(tmp_path / "reference.onnx"), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["cleanup_rc"] == 0, report["cleanup_err"]  # qonnx-cleanup as written, no --override-inpsize
    assert report["samples"] == 10 and report["agreement"] == 1.0  # against the simulation's logits here
    assert report["max_diff"] < 1e-4, json.dumps(report)  # float kernels of another onnxruntime version
    assert report["equal_same_runtime"], json.dumps(report)  # bit for bit against the QDQ lowering, same runtime
    widths = sum(len({b for b in plan.weights[layer.node]}) for layer in sites.layers)
    assert report["quant_nodes"] >= widths  # per-kernel widths survive cleanup as scalar-width groups
    assert report["datatypes"]  # datatype inference ran on every Quant

"""Run inside a venv with qonnx 1.0.0 (not the project's): cleanup as the CLI does it, datatype inference,
then ``execute_onnx`` on each sample; prints a JSON report. Usage: python qonnx_check.py MODEL NPZ REFERENCE WORKDIR.

NPZ holds ``x`` and ``logits`` (the simulation run by the project's onnxruntime); REFERENCE is a standard-op
model of the same plan (the QDQ lowering, which ``verify`` proves equal to the simulation), run here by this
venv's onnxruntime without graph optimizations (as ``execute_onnx`` runs each node) at the same batch size:
float kernels differ between onnxruntime versions and batch sizes, so bit equality is checked in one runtime."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.infer_datatypes import InferDataTypes

model_path, npz_path, simulation_path, workdir = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
clean = workdir / "clean.onnx"
cleanup = Path(sys.executable).parent / "qonnx-cleanup"
done = subprocess.run([str(cleanup), model_path, "--out-file", str(clean)], capture_output=True, text=True)
report = {"cleanup_rc": done.returncode, "cleanup_err": done.stderr[-2000:]}
if done.returncode == 0:
    model = ModelWrapper(str(clean)).transform(InferDataTypes())
    data = np.load(npz_path)
    x, expected = data["x"], data["logits"]
    iname, oname = model.graph.input[0].name, model.graph.output[0].name
    batch = model.get_tensor_shape(iname)[0]
    got = np.concatenate([execute_onnx(model, {iname: x[i:i + batch]})[oname] for i in range(0, len(x), batch)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(simulation_path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name  # at the same batch size: float kernels depend on it (1.9e-6 seen)
    here = np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    quants = [n for n in model.graph.node if n.op_type == "Quant"]
    report.update(samples=len(x), equal_same_runtime=bool(np.array_equal(got, here)),
                  max_diff_same_runtime=float(np.max(np.abs(got - here))),
                  equal=bool(np.array_equal(got, expected)),
                  max_diff=float(np.max(np.abs(got - expected))),
                  agreement=float(np.mean(got.argmax(1) == expected.argmax(1))),
                  quant_nodes=len(quants),
                  datatypes=sorted({model.get_tensor_datatype(n.output[0]).name for n in quants}),
                  onnxruntime=ort.__version__)
print(json.dumps(report))

"""Run a lowered (QDQ) model in the newest mainline ``onnxruntime`` from PyPI and compare it with the
simulated model's outputs.

onnxruntime and onnxruntime-training cannot share an environment, so the mainline runtime goes into a
throwaway virtual environment under /tmp (created on first use, reused after)::

    python bench/mainline_ort.py                                  # build, lower and check the reference models
    python bench/mainline_ort.py --model out.onnx --reference ref.npz   # check a model you lowered

``ref.npz`` (written by the calling side, in the project environment) holds ``x`` (inputs) and
``logits`` (what :func:`impq_onnx.quant.simulate.simulate`'s model gives for ``x`` in onnxruntime-training).
The child prints, for default and disabled graph optimizations: top-1 agreement and max |logit diff|.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VENV = Path(tempfile.gettempdir()) / "impq-mainline-ort"

CHILD = r"""
import json, sys
import numpy as np
import onnxruntime as ort
model, reference = sys.argv[1], sys.argv[2]
data = np.load(reference)
report = {"onnxruntime": ort.__version__, "model": model}
for level_name, level in (("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
                          ("disabled", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: data["x"]})[0]
    report[level_name] = {"samples": int(len(out)),
                          "top1_agreement": float(np.mean(out.argmax(1) == data["logits"].argmax(1))),
                          "max_logit_diff": float(np.max(np.abs(out - data["logits"])))}
print(json.dumps(report))
"""


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "onnxruntime", "numpy"],
                       check=True)
    return python


def check(python: Path, model: Path, reference: Path) -> dict:
    done = subprocess.run([str(python), "-c", CHILD, str(model), str(reference)], check=True, capture_output=True,
                          text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def mixed_plan(sites, scheme: str, seed: int, top: int):
    """Per-kernel weight bits drawn from 1..``top`` (both ends forced), one float kernel in the second layer,
    activation bits 1..8 cycled."""
    import numpy as np

    from impq_onnx.quant.plan import PrecisionPlan

    plan = PrecisionPlan.uniform(sites, None, None, weight_scheme=scheme, default_clip=2.5)
    rng = np.random.default_rng(seed)
    for i, layer in enumerate(sites.layers):
        bits = [int(b) for b in rng.integers(1, top + 1, layer.kernels)]
        bits[0], bits[-1] = 1, top
        if i == 1 and layer.kernels > 2:
            bits[1] = None
        plan.weights[layer.node] = bits
    for i, site in enumerate(sites.activations):
        plan.activations[site.tensor] = [3, 8, 1, 5, 2, 7, 4, 6][(i + seed) % 8]
    return plan.validate(sites)


def gemm_head_as_matmul(proto):
    """The model with its ``Gemm(x, W, b, transB=1)`` classifier written as ``MatMul(x, W^T) + b``."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    index, gemm = next((i, n) for i, n in enumerate(graph.node) if n.op_type == "Gemm")
    weights = {t.name: t for t in graph.initializer}
    transposed = numpy_helper.to_array(weights[gemm.input[1]]).T.copy()
    weights[gemm.input[1]].CopyFrom(numpy_helper.from_array(transposed, gemm.input[1]))
    product = f"{gemm.name}/matmul_out"
    nodes = [helper.make_node("MatMul", [gemm.input[0], gemm.input[1]], [product], name=f"{gemm.name}/matmul"),
             helper.make_node("Add", [product, gemm.input[2]], list(gemm.output), name=f"{gemm.name}/bias")]
    graph.node.pop(index)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    return proto


def prepare(workdir: Path) -> list[tuple[Path, Path]]:
    """Lower the package's reference architectures (random weights; one also with a MatMul + Add classifier)
    under mixed 1-7 and 1-8-bit plans; save each model and its reference."""
    import numpy as np

    from impq_onnx.architectures import fashion_net, mobilenet_v1_cifar, resnet20
    from impq_onnx.frontend.canonical import from_proto
    from impq_onnx.frontend.site_analysis import find_sites
    from impq_onnx.lowering.lower import lower, write
    from impq_onnx.quant.simulate import simulate
    from impq_onnx.runtime import inference_session

    cases = []
    for name, proto, shape in (("fashion_gemm", fashion_net(), (1, 28, 28)),
                               ("fashion_matmul", gemm_head_as_matmul(fashion_net()), (1, 28, 28)),
                               ("resnet20", resnet20(), (3, 32, 32)),
                               ("mobilenet_dw", mobilenet_v1_cifar(), (3, 32, 32))):
        canonical = from_proto(proto)
        sites = find_sites(canonical, (1, *shape))
        for scheme in ("midrise-max", "symmetric-rms"):
            for top in (7, 8):
                plan = mixed_plan(sites, scheme, seed=top, top=top)
                x = (np.random.default_rng(top).standard_normal((256, *shape)) * 1.5).astype(np.float32)
                logits = inference_session(simulate(canonical, plan, sites).SerializeToString()).run(
                    None, {canonical.input_name: x})[0]
                stem = workdir / f"{name}_{scheme}_max{top}"
                write(lower(canonical, plan, sites), stem.with_suffix(".onnx"))
                np.savez(stem.with_suffix(".npz"), x=x, logits=logits)
                cases.append((stem.with_suffix(".onnx"), stem.with_suffix(".npz")))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--reference")
    args = parser.parse_args()
    python = ensure_venv()
    if args.model:
        cases = [(Path(args.model), Path(args.reference))]
    else:
        cases = prepare(Path(tempfile.mkdtemp(prefix="impq-mainline-")))
    worst = 1.0
    for model, reference in cases:
        report = check(python, model, reference)
        worst = min(worst, report["all"]["top1_agreement"], report["disabled"]["top1_agreement"])
        print(json.dumps(report))
    print("PASS" if worst == 1.0 else "FAIL", f"(worst top-1 agreement {worst:.4f})")


if __name__ == "__main__":
    main()

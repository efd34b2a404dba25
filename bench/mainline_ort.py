"""Run a lowered (QDQ) model in the newest mainline ``onnxruntime`` from PyPI and compare it with the
simulated model's outputs.

onnxruntime and onnxruntime-training cannot share an environment, so the mainline runtime goes into a
throwaway virtual environment under /tmp (created on first use, reused after)::

    python bench/mainline_ort.py                                  # build, lower and check the tiny models
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
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "onnxruntime", "numpy"], check=True)
    return python


def check(python: Path, model: Path, reference: Path) -> dict:
    done = subprocess.run([str(python), "-c", CHILD, str(model), str(reference)], check=True, capture_output=True,
                          text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare(workdir: Path) -> list[tuple[Path, Path]]:
    """Lower the test suite's tiny models under mixed 1-8-bit plans; save each model and its reference."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from lowering_cases import inputs, mixed_plan, tiny  # noqa: E402
    from quant_models import tiny_cnn  # noqa: E402
    from tiny_models import Quirks, build  # noqa: E402

    from impq_onnx.lowering.lower import lower, write
    from impq_onnx.runtime import inference_session
    from impq_onnx.quant.simulate import simulate

    cases = []
    for name, proto in (("cnn", tiny_cnn()), ("dw_matmul", build(Quirks(head="matmul"))), ("dw_gemm", build(Quirks())),
                        ("bias_relu", build(Quirks(batchnorm=False)))):
        canonical, sites = tiny(proto)
        for scheme in ("midrise-max", "symmetric-rms"):
            for top in (7, 8):
                plan = mixed_plan(sites, scheme, seed=top)
                for node, bits in plan.weights.items():
                    plan.weights[node] = [None if b is None else min(b, top) for b in bits]
                x = inputs((256, 3, 8, 8), seed=top)
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

"""Deployment benchmark: our onnxruntime profile against onnxruntime's own quantizer, in mainline onnxruntime.

For the bundled Fashion-MNIST model, ResNet-20 and MobileNet-V1 (CIFAR-10):

1. in the project environment (onnxruntime-training 1.19.2): a uniform ``--weight-bits`` plan with
   8-bit activations (clips of sites without a batch-norm calibrated on a few training batches), lowered
   to ``--format ort`` and ``--format qdq``; the ort model is checked against its folded simulation
   (:func:`impq_onnx.lowering.verify.verify`, graph optimizations off) over the test set; top-1 of the
   float model, the plan's simulation, the folded simulation and the ort model;
2. in a throwaway venv with the newest mainline ``onnxruntime`` (created at ``/tmp/ortmain`` if missing):
   ``quant_pre_process`` + ``quantize_static`` (QDQ, per channel, uint8 activations, int8 weights,
   calibrated on the same images), then for float / quantize_static / ort / qdq: file size, fused integer
   kernels in the optimized graph (``SessionOptions.optimized_model_filepath``), top-1 with all graph
   optimizations, latency at batch 1 and 64 (same threads; median over interleaved rounds).

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/ortprofile-data
    python bench/deploy.py --cifar /tmp/ortprofile-data/cifar10 --out bench/results/deploy.md

Images never leave /tmp; only the table is written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VENV = Path("/tmp/ortmain")
MODELS = {  # name: (model, preprocess, data root (None: the bundled folders))
    "fashion-mnist": ("models/fashion-mnist/model.onnx", "fashion-mnist", None),
    "resnet20": ("models/resnet20-cifar10/swa/model.onnx", "cifar", "cifar"),
    "mobilenet-v1": ("models/mobilenet-v1-cifar10/model.onnx", "cifar", "cifar"),
}
VARIANTS = ("float", "static", "ort", "qdq")

CHILD = r"""
import json, os, sys, time
import numpy as np, onnx, onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
spec = json.load(open(sys.argv[1]))
threads, rounds = spec["threads"], spec["rounds"]
FUSED = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
         "DynamicQuantizeMatMul", "QLinearAdd", "QLinearGlobalAveragePool")

class Reader(CalibrationDataReader):
    def __init__(self, x, name):
        self.items = iter([{name: x[i:i + 32]} for i in range(0, len(x), 32)])
    def get_next(self):
        return next(self.items, None)

def session(path, optimized=None):
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = threads, 1, 3
    if optimized:
        o.optimized_model_filepath = optimized
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])

report = {"onnxruntime": ort.__version__, "models": {}}
for m in spec["models"]:
    d, name = m["dir"], m["name"]
    calib, test = np.load(f"{d}/calib.npz")["x"], np.load(f"{d}/test.npz")
    inp = onnx.load(f"{d}/float.onnx").graph.input[0].name
    quant_pre_process(f"{d}/float.onnx", f"{d}/float_pre.onnx")
    quantize_static(f"{d}/float_pre.onnx", f"{d}/static.onnx", Reader(calib, inp), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    rows = {}
    for v in spec["variants"]:
        path = f"{d}/{v}.onnx"
        s = session(path, f"{d}/{v}.optimized.onnx")
        ops = [n.op_type for n in onnx.load(f"{d}/{v}.optimized.onnx").graph.node]
        logits = np.concatenate([s.run(None, {inp: test["x"][i:i + 250]})[0] for i in range(0, len(test["x"]), 250)])
        rows[v] = {"bytes": os.path.getsize(path), "fused": {k: ops.count(k) for k in FUSED if ops.count(k)},
                   "float_convs": ops.count("Conv") + ops.count("FusedConv") + ops.count("NchwcConv"),
                   "top1": float(np.mean(logits.argmax(1) == test["y"])), "logits": logits}
    ref = rows["ort"]["logits"]
    if "ort_reference" in test:
        rows["ort"]["agree_reference"] = float(np.mean(ref.argmax(1) == test["ort_reference"].argmax(1)))
    if "integer_reference" in test:
        rows["ort"]["agree_integer"] = float(np.mean(ref.argmax(1) == test["integer_reference"].argmax(1)))
        rows["ort"]["diff_integer"] = float(np.max(np.abs(ref - test["integer_reference"])))
    for v in rows:
        rows[v].pop("logits")
    sessions = {v: session(f"{d}/{v}.onnx") for v in spec["variants"]}
    for batch in (1, 64):
        x = test["x"][:batch]
        runs = max(2, 64 // batch)
        for s in sessions.values():
            for _ in range(3):
                s.run(None, {inp: x})
        times = {v: [] for v in sessions}
        for r in range(rounds):
            order = list(sessions) if r % 2 == 0 else list(reversed(list(sessions)))
            for v in order:
                t = time.perf_counter()
                for _ in range(runs):
                    sessions[v].run(None, {inp: x})
                times[v].append((time.perf_counter() - t) / runs)
        for v in sessions:
            rows[v][f"ms_b{batch}"] = 1000 * float(np.median(times[v]))
    report["models"][name] = rows
print(json.dumps(report))
"""


def ensure_venv() -> Path:
    """The mainline venv; created if missing, completed with onnx + sympy (quantize_static needs them) if not there."""
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    probe = "import onnx, sympy, onnxruntime.quantization.shape_inference"
    if subprocess.run([str(python), "-c", probe], capture_output=True).returncode:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "onnxruntime", "numpy", "onnx", "sympy"], check=True)
    return python


def prepare(name: str, out: Path, args) -> dict:
    """Lower, verify and evaluate one model in the project environment; write what the child needs."""
    import onnx

    from impq_onnx.data.model_data import open_model_data
    from impq_onnx.frontend.canonical import load
    from impq_onnx.frontend.site_analysis import find_sites
    from impq_onnx.lowering.lower import lower
    from impq_onnx.lowering.targets.ort import folded_reference
    from impq_onnx.lowering.targets.ort_integer import integer_reference
    from impq_onnx.lowering.verify import verify
    from impq_onnx.quant.plan import PrecisionPlan
    from impq_onnx.quant.simulate import calibrate_clips, simulate
    from impq_onnx.runtime import inference_session

    model_path, preprocess, data = MODELS[name]
    canonical = load(ROOT / model_path)
    sites = find_sites(canonical)
    if data is None:
        train_dir, test_dir = ROOT / "models/fashion-mnist/train", ROOT / "models/fashion-mnist/test"
    else:
        train_dir, test_dir = Path(args.cifar) / "train", Path(args.cifar) / "test"
    train = open_model_data(canonical, train_dir, preprocess, limit_per_class=args.calibration_per_class).train_all
    test = open_model_data(canonical, test_dir, preprocess, limit_per_class=args.test_per_class).train_all
    calib_x = np.concatenate([x for x, _ in train.batches(64, shuffle=True, seed=0)])
    plan = PrecisionPlan.uniform(sites, args.weight_bits, 8, weight_scheme=args.scheme)
    calib_batches = [(calib_x[i:i + 64], None) for i in range(0, len(calib_x), 64)]
    plan = calibrate_clips(canonical.model, plan, sites, calib_batches, threads=args.threads)
    ort_model = lower(canonical, plan, sites, format="ort")
    qdq_model = lower(canonical, plan, sites, format="qdq")
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(canonical.to_proto(), out / "float.onnx")
    onnx.save(ort_model.proto, out / "ort.onnx")
    onnx.save(qdq_model.proto, out / "qdq.onnx")
    test_batches = list(test.batches(250))
    started = time.perf_counter()
    # verify's records, ranges and checker on the first batch; the logits of all batches are compared below
    check = verify(ort_model, canonical, plan, sites, test_batches, threads=args.threads, max_batches=1).to_dict()
    y = np.concatenate([b for _, b in test_batches])
    x = np.concatenate([b for b, _ in test_batches])
    logits = {}
    for key, proto, optimize in (("float", canonical.to_proto(), True),
                                 ("simulation", simulate(canonical, plan, sites), True),
                                 ("folded simulation", folded_reference(canonical, plan, sites), False),
                                 ("ort (1.19.2, optimizations off)", ort_model.proto, False),
                                 ("integer reference", integer_reference(ort_model.proto), False),
                                 ("ort (1.19.2, all optimizations)", ort_model.proto, True)):
        run = inference_session(proto.SerializeToString(), args.threads, optimize=optimize)
        logits[key] = np.concatenate([run.run(None, {canonical.input_name: b})[0] for b, _ in test_batches])
    top1 = {key: float(np.mean(v.argmax(1) == y)) for key, v in logits.items()}
    reference, lowered = logits["folded simulation"], logits["ort (1.19.2, optimizations off)"]
    check.update(samples=int(len(y)), agreement=float(np.mean(reference.argmax(1) == lowered.argmax(1))),
                 max_logit_diff=float(np.max(np.abs(reference - lowered))))
    check["ok"] = check["ok"] and check["agreement"] == 1.0
    integer, deployed = logits["integer reference"], logits["ort (1.19.2, all optimizations)"]
    check.update(deployed_agreement=float(np.mean(integer.argmax(1) == deployed.argmax(1))),
                 deployed_max_logit_diff=float(np.max(np.abs(integer - deployed))))
    np.savez(out / "calib.npz", x=calib_x)
    np.savez(out / "test.npz", x=x, y=y, ort_reference=reference, integer_reference=integer)
    return {"name": name, "dir": str(out), "test_images": int(len(y)), "calibration_images": int(len(calib_x)),
            "verify": {k: v for k, v in check.items() if k in ("samples", "agreement", "max_logit_diff", "ok",
                                                                "deployed_agreement", "deployed_max_logit_diff",
                                                                "fused_kernels")},
            "top1": top1, "seconds": time.perf_counter() - started,
            "bits": {"weight_bits_effective": plan.weight_bits_effective(sites), "scheme": args.scheme}}


def table(prepared: list[dict], child: dict, args, load: tuple) -> str:
    lines = [f"# Deployment in mainline onnxruntime {child['onnxruntime']}: our ort profile vs quantize_static", "",
             f"`python bench/deploy.py {' '.join(sys.argv[1:])}`; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, {args.threads} intra-op threads for every session, load average "
             f"{load[0]:.2f} before / {load[1]:.2f} after (shared machine: latencies are indicative). Latency: "
             f"median over {args.rounds} interleaved rounds (each round runs every model in turn; batch 1: 64 runs "
             "per round, batch 64: 2). Weights: uniform "
             f"{args.weight_bits}-bit `{args.scheme}` per kernel, 8-bit activations; quantize_static: "
             "`quant_pre_process` + QDQ, per channel, uint8 activations, int8 weights, same calibration images.", ""]
    lines += ["| model | variant | file KiB | fused integer kernels | float convs left | top-1 (mainline, all opts) "
              "| batch 1 ms | batch 64 ms | × float (b64) |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for p in prepared:
        rows = child["models"][p["name"]]
        for v in VARIANTS:
            r = rows[v]
            fused = ", ".join(f"{n} {c}" for n, c in r["fused"].items()) or "none"
            label = {"float": "float", "static": "quantize_static", "ort": "**ours: ort**", "qdq": "ours: qdq"}[v]
            lines.append(f"| {p['name']} | {label} | {r['bytes'] / 1024:.0f} | {fused} | {r['float_convs']} | "
                         f"{100 * r['top1']:.2f} % | {r['ms_b1']:.3f} | {r['ms_b64']:.2f} | "
                         f"{rows['float']['ms_b64'] / r['ms_b64']:.2f} |")
    lines += ["", "Exactness and the accuracy cost of folding (project environment, onnxruntime-training 1.19.2):", "",
              "| model | test images | verify (records + first 250 images; logits of all images: ort vs folded "
              "simulation, opts off) | float | simulation (BN unfolded) "
              "| folded simulation | ort (1.19.2, opts off) | ort in mainline (all opts) vs folded simulation |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for p in prepared:
        v, t = p["verify"], p["top1"]
        agree = child["models"][p["name"]]["ort"].get("agree_reference")
        lines.append(f"| {p['name']} | {p['test_images']} | {'ok' if v['ok'] else 'FAILED'}: agreement "
                     f"{100 * v['agreement']:.2f} %, max logit diff {v['max_logit_diff']:g} | "
                     f"{100 * t['float']:.2f} % | {100 * t['simulation']:.2f} % | "
                     f"{100 * t['folded simulation']:.2f} % | "
                     f"{100 * t['ort (1.19.2, optimizations off)']:.2f} % | top-1 agreement {100 * agree:.2f} % |")
    lines += ["", "As deployed (all graph optimizations: onnxruntime's fused integer kernels) against the integer "
              "reference of those kernels (`impq_onnx/lowering/targets/ort_integer.py`, standard ops run as "
              "written):", "",
              "| model | test images | integer reference top-1 | ort 1.19.2 (all opts) top-1 | 1.19.2 vs reference: "
              "agreement, max logit diff | ort in mainline (all opts) top-1 | mainline vs reference: agreement, "
              "max logit diff |", "|---|---:|---:|---:|---|---:|---|"]
    for p in prepared:
        v, t, row = p["verify"], p["top1"], child["models"][p["name"]]["ort"]
        lines.append(f"| {p['name']} | {p['test_images']} | {100 * t['integer reference']:.2f} % | "
                     f"{100 * t['ort (1.19.2, all optimizations)']:.2f} % | {100 * v['deployed_agreement']:.2f} %, "
                     f"{v['deployed_max_logit_diff']:g} | {100 * row['top1']:.2f} % | "
                     f"{100 * row['agree_integer']:.2f} %, {row['diff_integer']:g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", default="/tmp/ortprofile-data/cifar10", help="CIFAR-10 ImageFolder (train/, test/)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--scheme", default="midrise-max")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calibration-per-class", type=int, default=26, help="training images per class to calibrate")
    parser.add_argument("--test-per-class", type=int, default=None, help="test images per class (default all)")
    parser.add_argument("--work", default="/tmp/ortprofile-deploy")
    parser.add_argument("--out", default=None, help="markdown table (printed either way)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    prepared = [prepare(name, Path(args.work) / name, args) for name in args.models]
    for p in prepared:
        print(json.dumps(p), flush=True)
    spec = Path(args.work) / "spec.json"
    spec.write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, "variants": list(VARIANTS),
                                "models": [{"name": p["name"], "dir": p["dir"]} for p in prepared]}))
    child = subprocess.run([str(ensure_venv()), "-c", CHILD, str(spec)], capture_output=True, text=True)
    if child.returncode:
        sys.exit(f"mainline onnxruntime run failed:\n{child.stderr[-3000:]}")
    report = json.loads(child.stdout.strip().splitlines()[-1])
    text = table(prepared, report, args, (load_before, os.getloadavg()[0]))
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

"""Bits on disk: file sizes of the qdq, qdq-int4, packed and packed-folded outputs of ResNet-20 at 8, 4 and 2 bits.

    python bench/bits_on_disk.py [--model M.onnx] [--data cifar10/test] [--mainline /tmp/ortmain/bin/python]

Uniform plans (every kernel at B bits, ``midrise-max`` and ``symmetric-rms``, float activations), no
training. Prints a markdown table of the bytes each format writes (model, ``.packed``; the ``.bits.json``
sidecar is the same record for all and left out), with the packed pairs' ratio to the 8-bit pair of the
same format, and where the bytes of the 2-bit packed-folded model go; and checks exactness: every lowered
model is verified against the simulation (onnxruntime-training, 100 % top-1 agreement, max logit
difference), and with
``--mainline`` the qdq-int4 models also run in that interpreter's mainline onnxruntime (all graph
optimizations and none) next to the qdq models, which must give the same logits. Inputs: ``--samples``
images spread evenly over ``--data`` (all classes), or seeded normal noise.

Then the real mixed per-kernel plans ``--plans`` (default: iterations 4, 5 and 6 of the committed SWA
kernel search) in both packed formats, each against the same plan with every weight at 8 bits (same
activation clips) and against the uniform 8-bit pair; each verified, and its plan read back from the
written model's annotation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import onnx

from impq_onnx.frontend.canonical import load
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.lowering.lower import lower, write
from impq_onnx.lowering.passes.annotate_bits import read_plan_from_annotation
from impq_onnx.lowering.verify import verify
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.simulate import simulate
from impq_onnx.runtime import inference_session

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("qdq", "qdq-int4", "packed", "packed-folded")
PACKED = ("packed", "packed-folded")
PLANS = [f"bench/runs/resnet20-swa/swa-kernel-174-distill.work/iterations/{i:04d}/plan.yaml" for i in (4, 5, 6)]

# Runs in the mainline venv: the qdq and qdq-int4 models on the same inputs, both optimization levels.
MAINLINE = r"""
import json, sys
import numpy as np
import onnxruntime as ort
qdq, int4, reference = sys.argv[1], sys.argv[2], sys.argv[3]
data = np.load(reference)
report = {"onnxruntime": ort.__version__}
levels = ort.GraphOptimizationLevel
for name, level in (("all", levels.ORT_ENABLE_ALL), ("none", levels.ORT_DISABLE_ALL)):
    options = ort.SessionOptions()
    options.graph_optimization_level, options.intra_op_num_threads, options.log_severity_level = level, 2, 3
    out = [ort.InferenceSession(m, options, providers=["CPUExecutionProvider"]).run(None, {"input": data["x"]})[0]
           for m in (qdq, int4)]
    report[name] = {"int4_vs_qdq": float(np.max(np.abs(out[1] - out[0]))),
                    "agreement_vs_simulation": float(np.mean(out[1].argmax(1) == data["logits"].argmax(1)))}
print(json.dumps(report))
"""


def _inputs(canonical, data: str | None, samples: int) -> np.ndarray:
    if data is None:
        shape = [samples] + list(canonical.input_shape()[1:])
        return np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    from impq_onnx.data.model_data import open_model_data

    dataset = open_model_data(canonical, data).evaluation
    return dataset.load(np.linspace(0, len(dataset) - 1, min(samples, len(dataset))).astype(np.int64))  # all classes


def measure(model: str, data: str | None, samples: int, mainline: str | None, workdir: Path) -> list[dict]:
    canonical = load(model)
    sites = find_sites(canonical, None)
    x = _inputs(canonical, data, samples)
    rows = []
    for scheme in ("midrise-max", "symmetric-rms"):
        for bits in (8, 4, 2):
            plan = PrecisionPlan.uniform(sites, bits, None, weight_scheme=scheme)
            row = {"scheme": scheme, "bits": bits, "weight_bits": plan.weight_bits_effective(sites)}
            for fmt in FORMATS:
                lowered = lower(canonical, plan, sites, format=fmt)
                path = workdir / f"{scheme}-{bits}-{fmt}.onnx"
                paths = write(lowered, path)
                sizes = {p.suffix: p.stat().st_size for p in paths if not p.name.endswith(".bits.json")}
                result = verify(lowered, canonical, plan, sites, [x])
                if fmt == "packed-folded" and bits == 2:
                    row["breakdown"] = breakdown(lowered.proto)
                row[fmt] = {"model": sizes[".onnx"], "packed": sizes.get(".packed", 0), "ok": result.ok,
                            "max_logit_diff": result.max_logit_diff,
                            "dtypes": sorted({e["dtype"] for e in lowered.sidecar["weights"].values()})}
                if fmt == "qdq-int4" and mainline:
                    reference = workdir / f"{scheme}-{bits}.npz"
                    logits = inference_session(simulate(canonical, plan, sites).SerializeToString(), 2).run(
                        None, {canonical.input_name: x})[0]
                    np.savez(reference, x=x, logits=logits)
                    qdq_path = workdir / f"{scheme}-{bits}-qdq.onnx"
                    done = subprocess.run([mainline, "-c", MAINLINE.replace('"input"', repr(canonical.input_name)),
                                           str(qdq_path), str(path), str(reference)], check=True,
                                          capture_output=True, text=True)
                    row[fmt]["mainline"] = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
    return rows


def _pair(canonical, plan: PrecisionPlan, sites, fmt: str, x: np.ndarray, path: Path) -> dict:
    lowered = lower(canonical, plan, sites, format=fmt)
    paths = write(lowered, path)
    sizes = {p.suffix: p.stat().st_size for p in paths if not p.name.endswith(".bits.json")}
    result = verify(lowered, canonical, plan, sites, [x])
    read_back = read_plan_from_annotation(onnx.load(str(path))) == plan
    return {"model": sizes[".onnx"], "packed": sizes[".packed"], "total": sizes[".onnx"] + sizes[".packed"],
            "exact": result.ok and result.max_logit_diff == 0.0 and read_back}


def measure_mixed(model: str, plans: list[str], data: str | None, samples: int, workdir: Path) -> list[dict]:
    """Each mixed plan and the same plan with every weight at 8 bits, in both packed formats."""
    canonical = load(model)
    sites = find_sites(canonical, None)
    x = _inputs(canonical, data, samples)
    uniform = PrecisionPlan.uniform(sites, 8, None, weight_scheme="midrise-max")
    rows = []
    for name in plans:
        plan = PrecisionPlan.load(ROOT / name).validate(sites)
        eight = plan.copy()
        eight.weights = {node: [8] * len(bits) for node, bits in plan.weights.items()}
        row = {"plan": name, "weight_bits": plan.weight_bits_effective(sites)}
        for fmt in PACKED:
            row[fmt] = {"mixed": _pair(canonical, plan, sites, fmt, x, workdir / f"mixed-{fmt}.onnx"),
                        "eight": _pair(canonical, eight, sites, fmt, x, workdir / f"eight-{fmt}.onnx"),
                        "uniform": _pair(canonical, uniform, sites, fmt, x, workdir / f"uniform-{fmt}.onnx")}
        rows.append(row)
    return rows


def table_mixed(rows: list[dict]) -> str:
    lines = ["| plan | weight bits (effective) | format | model + `.packed` = total | same plan, weights 8-bit | "
             "uniform 8-bit | / same plan 8-bit | / uniform 8-bit | exact (verify, plan read back) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        for fmt in PACKED:
            m, e, u = row[fmt]["mixed"], row[fmt]["eight"], row[fmt]["uniform"]
            lines.append(f"| `{row['plan'].split('/iterations/')[-1]}` | {row['weight_bits']:.3f} | {fmt} | "
                         f"{m['model']:,} + {m['packed']:,} = {m['total']:,} | {e['total']:,} | {u['total']:,} | "
                         f"{m['total'] / e['total']:.4f} | {m['total'] / u['total']:.4f} | "
                         f"{'yes' if m['exact'] and e['exact'] and u['exact'] else 'NO'} |")
    return "\n".join(lines)


def breakdown(proto) -> dict[str, int]:
    """Serialized bytes of the parts of a model: initializers, nodes by op type, metadata."""
    parts: dict[str, int] = {}
    for t in proto.graph.initializer:
        parts["initializers (scales, biases, shape constants)"] = (
            parts.get("initializers (scales, biases, shape constants)", 0) + t.ByteSize())
    for n in proto.graph.node:
        key = f"{n.op_type} nodes" if n.op_type in ("UnpackBits", "Conv") else "other nodes"
        parts[key] = parts.get(key, 0) + n.ByteSize()
    for p in proto.metadata_props:
        parts[f"metadata {p.key}"] = p.ByteSize()
    parts["rest (graph inputs/outputs, opsets, headers)"] = proto.ByteSize() - sum(parts.values())
    return parts


def table(rows: list[dict]) -> str:
    lines = ["| scheme | B | qdq model (dtype) | qdq-int4 model (dtype) | packed: model + `.packed` = total | "
             "packed-folded: model + `.packed` = total | `.packed` / 8-bit | packed total / 8-bit | "
             "packed-folded total / 8-bit | exact (verify) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        eight = next(r for r in rows if r["scheme"] == row["scheme"] and r["bits"] == 8)
        totals = {f: row[f]["model"] + row[f]["packed"] for f in PACKED}
        totals8 = {f: eight[f]["model"] + eight[f]["packed"] for f in PACKED}
        exact = all(row[f]["ok"] and row[f]["max_logit_diff"] == 0.0 for f in FORMATS)
        lines.append(
            f"| {row['scheme']} | {row['bits']} | {row['qdq']['model']:,} ({'/'.join(row['qdq']['dtypes'])}) | "
            f"{row['qdq-int4']['model']:,} ({'/'.join(row['qdq-int4']['dtypes'])}) | "
            + " | ".join(f"{row[f]['model']:,} + {row[f]['packed']:,} = {totals[f]:,}" for f in PACKED) + " | "
            f"{row['packed']['packed'] / eight['packed']['packed']:.3f} | "
            + " | ".join(f"{totals[f] / totals8[f]:.3f}" for f in PACKED) + f" | {'yes' if exact else 'NO'} |")
    for row in rows:
        if "breakdown" in row:
            lines += ["", f"Bytes of the 2-bit packed-folded model, {row['scheme']}:", ""]
            lines += [f"- {k}: {v:,}" for k, v in row["breakdown"].items()]
    mainline = [(r["scheme"], r["bits"], r["qdq-int4"]["mainline"]) for r in rows if "mainline" in r["qdq-int4"]]
    if mainline:
        lines += ["", "qdq-int4 next to qdq in mainline onnxruntime (same runtime, same inputs):", ""]
        for scheme, bits, m in mainline:
            lines.append(f"- {scheme} {bits}-bit, onnxruntime {m['onnxruntime']}: max |int4 - qdq| "
                         f"{m['all']['int4_vs_qdq']} (all optimizations), {m['none']['int4_vs_qdq']} (none); "
                         f"top-1 agreement with the simulation {m['all']['agreement_vs_simulation']:.1%}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models/resnet20-cifar10/swa/model.onnx"))
    parser.add_argument("--data", default=None)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--mainline", default=None, help="python of a venv with mainline onnxruntime")
    parser.add_argument("--plans", nargs="*", default=PLANS, help="mixed plans (relative to the repository)")
    parser.add_argument("--mixed-only", action="store_true", help="only the mixed-plan table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.mixed_only:
            print(table(measure(args.model, args.data, args.samples, args.mainline, Path(tmp))))
        print("\nMixed per-kernel plans (packed formats):\n")
        print(table_mixed(measure_mixed(args.model, args.plans, args.data, args.samples, Path(tmp))))


if __name__ == "__main__":
    main()

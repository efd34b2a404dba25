"""The zoo matrix at the bench sizes: every architecture through impq-onnx as published, timed per model.

    /tmp/zoo-torchvenv/bin/python models/zoo/make_zoo.py --full /tmp/zoo-full    # once (torch venv, ~4 min)
    python bench/zoo.py [--models DIR] [--only a,b] [--steps 4] [--out bench/results/zoo.md]

``--models`` defaults to /tmp/zoo-full (``make_zoo.py --full``: every width and input size doubled, ViT's
dims doubled); ``--models models/zoo`` runs the CI sizes. Per model, as ``tests/zoo/test_zoo_matrix.py``
does but with a larger budget: ``inspect`` -> ``compress`` W4A8 (start bits at the targets, ``--steps``
fine-tune steps, 16 sensitivity samples, 40 PNG images decoded from disk) -> ``verify`` (exact codes and
logits) -> interface unchanged -> the written model runs in onnxruntime with the original's input. Prints and writes
a table: file size, parameters, wall time of each command, the outcome (the exact one-line error where a
step failed), and the load average before and after, since the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models" / "zoo"))
from zoo_inputs import class_images, input_size  # noqa: E402 - the zoo's own module, shared with the tests

IMPQ = str(Path(sys.executable).parent / "impq-onnx")


def _timed(args: list[str], stdout: list[str] | None = None) -> tuple[float, int, str]:
    """Wall seconds, exit code and last error line of ``impq-onnx args``; its stdout is appended to ``stdout``."""
    start = time.perf_counter()
    done = subprocess.run([IMPQ, *args], capture_output=True, text=True, timeout=1800)
    if stdout is not None:
        stdout.append(done.stdout)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "error" in line.lower()]
    return time.perf_counter() - start, done.returncode, (lines[-1] if lines else "")[:200]


def run_model(path: Path, work: Path, steps: int) -> dict:
    from impq_onnx.frontend.interface import interface_of
    from impq_onnx.runtime import inference_session

    original_bytes = path.read_bytes()
    original = onnx.load(str(path))
    h, w, layout = input_size(original, dynamic=(64, 80))
    data = class_images(work / "images", h, w, per_class=4)
    row: dict = {"model": path.stem, "bytes": path.stat().st_size, "input": f"{h}x{w} {layout}"}
    row["inspect_s"], code, error = _timed(["inspect", str(path), "--json"])
    if code:
        return {**row, "outcome": f"inspect exit {code}: {error}"}
    out = work / "out" / "m.onnx"
    row["compress_s"], code, error = _timed([
        "compress", str(path), "--data", str(data), "--output", str(out), "--quiet", "--no-report",
        "--start-bits", "4", "--target-bits", "4", "--start-act-bits", "8", "--target-act-bits", "8",
        "--max-iterations", "1", "--steps", str(steps), "--start-steps", str(steps), "--batch-size", "8",
        "--lr", "0.0001", "--sensitivity-samples", "16", "--val-fraction", "0"])
    if code:
        return {**row, "outcome": f"compress exit {code}: {error}"}
    printed: list[str] = []
    row["verify_s"], code, error = _timed(["verify", str(out), "--model", str(out.with_name("m.float.onnx")),
                                           "--plan", str(out.with_name("m.plan.yaml")), "--data", str(data),
                                           "--json"], printed)
    if printed and "{" in printed[0]:
        checked = json.loads(printed[0][printed[0].index("{"):])
        row["logit_diff"], row["tie_flips"] = checked["max_logit_diff"], checked["tie_flips"]
    if code:
        return {**row, "outcome": f"verify exit {code}: {error}"}
    written = onnx.load(str(out))
    if interface_of(written) != interface_of(original) or path.read_bytes() != original_bytes:
        return {**row, "outcome": "interface changed"}
    info = original.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in info.type.tensor_type.shape.dim]
    dims = [dims[0], h, w, 3] if layout == "NHWC" else [dims[0], 3, h, w]
    x = np.random.default_rng(0).standard_normal(dims).astype(onnx.helper.tensor_dtype_to_np_dtype(
        info.type.tensor_type.elem_type))
    ours = inference_session(written.SerializeToString()).run(None, {info.name: x})
    theirs = inference_session(original_bytes).run(None, {info.name: x})
    if [(a.dtype, a.shape) for a in ours] != [(b.dtype, b.shape) for b in theirs]:
        return {**row, "outcome": "outputs differ in type or shape"}
    return {**row, "outcome": "ok"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("/tmp/zoo-full"))
    parser.add_argument("--only", default=None, help="comma-separated file stems")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="write the table here (markdown)")
    args = parser.parse_args()
    manifest_path = args.models / "manifest.json"
    if not manifest_path.exists():
        print(f"{manifest_path} not found: run models/zoo/make_zoo.py --full {args.models} in a torch venv",
              file=sys.stderr)
        return 2
    manifest = json.loads(manifest_path.read_text())
    paths = [args.models / entry["file"] for entry in manifest.values()]
    paths += [ROOT / "tests/models/exported" / n for n in ("tf2onnx_keras_cnn_opset13.onnx",
                                                            "paddle2onnx_mobilenetv3_opset13.onnx")]
    if args.only:
        paths = [p for p in paths if p.stem in args.only.split(",")]
    load_before = os.getloadavg()
    rows = []
    for path in sorted(paths):
        with tempfile.TemporaryDirectory(prefix="impq-zoo-") as tmp:
            row = run_model(path, Path(tmp), args.steps)
        entry = manifest.get(path.stem, {})
        row["exporter"] = entry.get("exporter", "real (tests/models/exported)")
        row["variant"] = entry.get("variant", "")
        rows.append(row)
        print(json.dumps(row), flush=True)
    load_after = os.getloadavg()
    head = ("| model | exporter | variant | input | bytes | inspect s | compress s | verify s | max logit diff "
            "| tie flips | outcome |")
    lines = [head, "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        checked = f"{r['logit_diff']:.3g} | {r['tie_flips']}" if "logit_diff" in r else "- | -"
        lines.append(f"| {r['model']} | {r['exporter']} | {r['variant']} | {r['input']} | {r['bytes']} | "
                     + " | ".join(f"{r[k]:.1f}" if k in r else "-" for k in ("inspect_s", "compress_s", "verify_s"))
                     + f" | {checked} | {r['outcome']} |")
    passed = sum(r["outcome"] == "ok" for r in rows)
    lines.append("")
    lines.append(f"{passed}/{len(rows)} ok; --steps {args.steps}; load average (1/5/15 min) before "
                 f"{'/'.join(f'{v:.1f}' for v in load_before)}, after {'/'.join(f'{v:.1f}' for v in load_after)}; "
                 f"{os.cpu_count()} cores")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Validation evaluation inside a search iteration: one session vs single-threaded replicas, float model re-run
vs its classes computed once.

    python bench/eval_replicas.py [--model models/resnet20-cifar10/swa/model.onnx] [--images 1024] [--rounds 3]

Times :func:`impq_onnx.engine.evaluate` of a W4A4 simulation (ResNet-20 by default, seeded normal inputs
in batches of the search's ``EVAL_BATCH``) the way a search iteration ran it before (one session on every
thread, the float model run beside it for the agreement) and the way it runs now (one single-threaded
session per thread, the float model's classes computed once per run), interleaved, and prints the medians,
their ratio and the load average. Both give the same top-1 and agreement (checked).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from impq_onnx.engine.evaluation import evaluate, predicted_classes
from impq_onnx.frontend.canonical import load
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.search.iteration import EVAL_BATCH

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models/resnet20-cifar10/swa/model.onnx"))
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    canonical = load(args.model)
    sites = find_sites(canonical, None)
    shape = [args.images] + list(canonical.input_shape()[1:])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    batches = [(x[i:i + EVAL_BATCH], None) for i in range(0, len(x), EVAL_BATCH)]
    plan = PrecisionPlan.uniform(sites, 4, 4, default_clip=4.0)
    print(f"{args.model}: {args.images} images, batch {EVAL_BATCH}, W4A4, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}")
    times: dict[str, list[float]] = {"before: 1 session, float model each time": [],
                                     "now: replicas, float classes once": []}
    results = {}
    start = time.perf_counter()
    classes = predicted_classes(canonical, batches)
    once = time.perf_counter() - start
    for _ in range(args.rounds):
        for name in times:
            start = time.perf_counter()
            if name.startswith("before"):
                result = evaluate(canonical, batches, plan=plan, sites=sites, float_model=canonical, replicas=1)
            else:
                result = evaluate(canonical, batches, plan=plan, sites=sites, float_classes=classes)
            times[name].append(time.perf_counter() - start)
            results[name] = (result.top1, result.agreement)
    assert len(set(results.values())) == 1, results
    medians = {name: float(np.median(t)) for name, t in times.items()}
    for name, t in times.items():
        print(f"| {name} | {' / '.join(f'{s:.2f}' for s in t)} s | median {medians[name]:.2f} s |")
    before, now = medians.values()
    print(f"ratio {before / now:.2f}x per evaluation; the float classes took {once:.2f} s once per run; "
          f"agreement {results[next(iter(results))][1]:.4f}; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

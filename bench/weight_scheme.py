"""Each weight scheme on its own, calibration only: every kernel at B bits, activations float, no fine-tune.

For each ``--bits`` and each ``--schemes`` entry, the test top-1 and agreement with the float model of
``PrecisionPlan.uniform(sites, B, None, weight_scheme=...)`` on the evaluation split, and the squared quantization
error of the weights relative to their energy. ``--batchnorm-stats N``: the simulated model's batch-norm
statistics re-estimated on N training batches of 128 first (``engine.recompute_batchnorm``), which takes out
the scale and shift a scheme's rounding puts on each layer's output.

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp
    .venv/bin/python bench/weight_scheme.py models/resnet20-cifar10/swa/model.onnx --data /tmp/cifar10
    .venv/bin/python bench/weight_scheme.py models/mobilenet-v1-cifar10/model.onnx --data /tmp/cifar10
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from onnx import numpy_helper

import impq_onnx
from impq_onnx.data.model_data import open_model_data
from impq_onnx.engine import evaluate, recompute_batchnorm
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.simulate import simulate
from impq_onnx.sensitivity import weight_noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--bits", default="1,2,3,4")
    parser.add_argument("--schemes", default="midrise-max,midrise-rms")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batchnorm-stats", type=int, default=0, metavar="N",
                        help="re-estimate the batch-norm statistics on N training batches first (0: no)")
    args = parser.parse_args()
    start = time.perf_counter()
    model = impq_onnx.load(args.model)
    data = open_model_data(model, args.data, None)
    sites = find_sites(model, (1, *data.evaluation.sample_shape))
    proto = model.to_proto()
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    stats = f"re-estimated on {args.batchnorm_stats} batches" if args.batchnorm_stats else "as trained"
    print(f"{args.model}: {len(sites.layers)} layers, {sum(layer.kernels for layer in sites.layers)} kernels; "
          f"{len(data.evaluation)} evaluation images; batch-norm statistics {stats}; load {os.getloadavg()[0]:.1f}")
    print("| bits | scheme | top-1 % | agreement % | weight error / energy |")
    print("| --- | --- | --- | --- | --- |")
    for bits in (int(b) for b in args.bits.split(",")):
        for name in args.schemes.split(","):
            plan = PrecisionPlan.uniform(sites, bits, None, weight_scheme=name)
            noise = weight_noise(sites, proto, plan, bits)  # per layer, per kernel: mean squared error
            error = sum(float(np.sum(noise[layer.node])) * layer.kernel_params for layer in sites.layers)
            energy = sum(float(np.sum(np.asarray(weights[layer.weight], np.float64) ** 2)) for layer in sites.layers)
            if args.batchnorm_stats:
                tuned = recompute_batchnorm(simulate(model, plan, sites), data.train.batches(128, shuffle=True),
                                            threads=args.threads, max_batches=args.batchnorm_stats)
                r = evaluate(tuned, data.evaluation.batches(250), float_model=model, threads=args.threads)
            else:
                r = evaluate(model, data.evaluation.batches(250), plan=plan, sites=sites, float_model=model,
                             threads=args.threads)
            print(f"| {bits} | {name} | {100 * r.top1:.2f} | {100 * r.agreement:.2f} | {error / energy:.4f} |",
                  flush=True)
    print(f"{time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

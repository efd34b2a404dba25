"""Sensitivity benchmark: fast vs exact path on ResNet-20 (CIFAR-10), and memory on a 224x224 MobileNet-V1.

    .venv/bin/python bench/sensitivity.py --data /tmp/cifar10/test [--samples 256] [--train-steps 0 | --model M.onnx]
    .venv/bin/python bench/sensitivity.py --part mobilenet [--samples 8]

Part ``resnet`` (default): ResNet-20 (untrained, or fine-tuned for ``--train-steps`` float SGD steps
on ``--train-data`` when > 0; the trained weights are cached in ``--cache``), ``--samples`` CIFAR-10
test images (a fixed random subset). It runs the exact path once and the fast path with one
backward per runner-up rank and with 1, 2 and 4 Rademacher probes, and prints, per fast variant,
the Spearman rank correlation with the exact path (kernel groups, activation sites), samples/s and
the max relative error; then the paper-vs-reference weighting correlation. Part ``mobilenet``
(run in a child process so its peak RSS is its own): the fast path on MobileNet-V1 at 224x224
(1000 classes, ImageNet strides) with random inputs; prints samples/s and ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import numpy as np

from impq_onnx.data.model_data import open_model_data
from impq_onnx.frontend.canonical import from_proto
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.sensitivity import noise_gain


def spearman(a: dict, b: dict) -> float:
    keys = sorted(a)
    x = np.array([a[k] for k in keys])
    y = np.array([b[k] for k in keys])
    rx = _ranks(x)
    ry = _ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    # average ranks for ties (dead channels give exact zeros)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=float)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cifar_subset(canonical, path: str, samples: int, seed: int = 0) -> np.ndarray:
    data = open_model_data(canonical, path, "cifar").evaluation
    idx = np.sort(np.random.default_rng(seed).choice(len(data), samples, replace=False))
    return data.load(idx)


def trained_resnet20(args) -> object:
    from impq_onnx.architectures import resnet20

    if args.model:
        from impq_onnx.frontend.canonical import load

        return load(args.model), args.model
    canonical = from_proto(resnet20())
    if args.train_steps <= 0:
        return canonical, "untrained"
    import onnx

    cache = os.path.join(args.cache, f"resnet20_{args.train_steps}steps.onnx")
    if os.path.exists(cache):
        return from_proto(onnx.load(cache)), f"fine-tuned {args.train_steps} steps (cached {cache})"
    from impq_onnx.engine import evaluate, fine_tune

    sites = find_sites(canonical)
    train = open_model_data(canonical, args.train_data, "cifar", workers=2).train_all
    per_epoch = train.num_batches(128, drop_last=True)

    def batches():
        epoch = 0
        while True:
            yield from train.batches(128, shuffle=True, seed=epoch, augment=True, drop_last=True)
            epoch += 1

    t0 = time.time()
    trained = fine_tune(canonical, None, sites, batches, steps=args.train_steps, lr=0.1, optimizer="sgd",
                        warmup_steps=20, progress=False)
    canonical = trained.apply_to(canonical)
    os.makedirs(args.cache, exist_ok=True)
    onnx.save(canonical.to_proto(), cache)
    test = open_model_data(canonical, args.data, "cifar", limit_per_class=100).evaluation
    result = evaluate(canonical, test.batches(250))
    print(f"trained {args.train_steps} steps ({args.train_steps / per_epoch:.2f} epochs) in {time.time() - t0:.0f} s: "
          f"{result}")
    return canonical, f"fine-tuned {args.train_steps} steps"


def part_resnet(args) -> None:
    canonical, label = trained_resnet20(args)
    sites = find_sites(canonical)
    x = cifar_subset(canonical, args.data, args.samples)
    if args.train_only:
        return
    print(f"ResNet-20 ({label}), {len(x)} CIFAR-10 test samples, {len(sites.layers)} layers, "
          f"{sum(layer.kernels for layer in sites.layers)} kernels, {len(sites.activations)} activation sites")
    t0 = time.perf_counter()
    exact = noise_gain(canonical, sites, [x], method="exact")
    t_exact = time.perf_counter() - t0
    print(f"exact: {t_exact:.1f} s ({len(x) / t_exact:.1f} samples/s), ties skipped {exact.ties}, "
          f"peak RSS {max_rss_mib():.0f} MiB")
    print(f"{'fast variant':>22} {'wall s':>7} {'samples/s':>10} {'cpu s':>6} {'rho(kernels)':>13} {'rho(layers)':>12} "
          f"{'rho(acts)':>10} {'max rel err':>12}")
    exact_layer = noise_gain(canonical, sites, [x], method="fast", probes=None, granularity="layer")
    variants = [(None, "graph"), (1, "graph"), (1, "numpy"), (2, "graph"), (4, "graph")]
    for probes, rebuild in variants:
        rhos, times, cpus = [], [], []
        for rep in range(args.repeats if probes is not None else 1):
            t0, c0 = time.perf_counter(), os.times()
            fast = noise_gain(canonical, sites, [x], method="fast", probes=probes, seed=rep, rebuild=rebuild)
            c1 = os.times()
            times.append(time.perf_counter() - t0)
            cpus.append(c1.user - c0.user + c1.system - c0.system)
            layer = noise_gain(canonical, sites, [x], method="fast", probes=probes, seed=rep, granularity="layer")
            rhos.append((spearman(exact.weights, fast.weights), spearman(exact_layer.weights, layer.weights),
                         spearman(exact.activations, fast.activations)))
        rho = np.min(np.array(rhos), axis=0)  # the worst of the repeats
        err = max(abs(fast.weights[k] - exact.weights[k]) / max(exact.weights.values()) for k in exact.weights)
        t = float(np.min(times))
        name = ("ranks (exact)" if probes is None else f"{probes} probe(s)") + f" [{rebuild}]"
        print(f"{name:>22} {t:7.2f} {len(x) / t:10.0f} {min(cpus):6.2f} {rho[0]:13.4f} {rho[1]:12.4f} {rho[2]:10.4f} "
              f"{err:12.2e}", flush=True)
    print(f"load average (other processes share the 2 cores): {os.getloadavg()[0]:.2f}")
    ordering(canonical, sites, x, args)
    print(f"peak RSS {max_rss_mib():.0f} MiB")


def _mismatch(canonical, sites, plan, x, float_top) -> float:
    from impq_onnx.quant.simulate import simulate
    from impq_onnx.runtime import inference_session

    session = inference_session(simulate(canonical, plan, sites).SerializeToString())
    z = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float(np.mean(np.argmax(z, axis=1) != float_top))


def ordering(canonical, sites, x, args) -> None:
    """Which weighting orders layers by the damage their quantization really does?

    Truth: the mismatch rate against the float model when only that layer's weights (only that
    activation site) are quantized to ``--truth-bits``, everything else float.
    """
    from impq_onnx.quant.plan import PrecisionPlan
    from impq_onnx.runtime import inference_session

    session = inference_session(canonical.to_bytes())
    float_top = np.argmax(session.run(None, {canonical.input_name: x})[0], axis=1)
    base = PrecisionPlan.uniform(sites, None, None)
    from impq_onnx.quant.simulate import calibrate_clips

    base = calibrate_clips(canonical, base, sites, [x])
    truth_w, truth_a = {}, {}
    for layer in sites.layers:
        plan = base.copy()
        plan.weights[layer.node] = [args.truth_bits] * layer.kernels
        truth_w[layer.node] = _mismatch(canonical, sites, plan, x, float_top)
    for site in sites.activations:
        plan = base.copy()
        plan.activations[site.tensor] = args.truth_bits
        truth_a[site.tensor] = _mismatch(canonical, sites, plan, x, float_top)
    print(f"ordering vs truth (mismatch with one layer/site at {args.truth_bits} bits, {len(x)} samples; "
          f"truth range w {min(truth_w.values()):.3f}..{max(truth_w.values()):.3f}, "
          f"a {min(truth_a.values()):.3f}..{max(truth_a.values()):.3f}):")
    for weighting in ("paper", "reference", "step", "measured"):
        table = noise_gain(canonical, sites, [x], plan=base, probes=None, granularity="layer", weighting=weighting)
        print(f"  {weighting:>9}: rho(layer weights) {spearman(truth_w, table.weights):.4f}, "
              f"rho(activation sites) {spearman(truth_a, table.activations):.4f}")


def part_mobilenet(args) -> None:
    from impq_onnx.architectures import mobilenet_v1_cifar

    proto = mobilenet_v1_cifar(num_classes=1000)
    proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 224
    proto.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 224
    stem = next(n for n in proto.graph.node if n.name == "conv1")
    for attr in stem.attribute:
        if attr.name == "strides":
            attr.ints[:] = [2, 2]
    canonical = from_proto(proto)
    sites = find_sites(canonical)
    x = np.random.default_rng(0).standard_normal((args.samples, 3, 224, 224)).astype(np.float32)
    before = max_rss_mib()
    t0 = time.perf_counter()
    table = noise_gain(canonical, sites, [x], method="fast", probes=args.probes, chunk=args.chunk)
    t = time.perf_counter() - t0
    kernels = sum(layer.kernels for layer in sites.layers)
    print(f"MobileNet-V1 224x224, 1000 classes: {len(sites.layers)} layers, {kernels} "
          f"kernels; fast path ({table.method}), {len(x)} samples in {t:.1f} s ({len(x) / t:.2f} samples/s); "
          f"peak RSS {max_rss_mib():.0f} MiB (before measuring {before:.0f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("resnet", "mobilenet", "all"), default="all")
    parser.add_argument("--data", default="/tmp/cifar10/test")
    parser.add_argument("--train-data", default="/tmp/cifar10/train")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--model", help="a trained ResNet-20 .onnx (e.g. models/resnet20-cifar10/model.onnx)")
    parser.add_argument("--cache", default="/tmp/impq-bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probes", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--truth-bits", type=int, default=2)
    parser.add_argument("--train-only", action="store_true", help="only fine-tune and cache the ResNet-20")
    args = parser.parse_args()
    if args.part in ("resnet", "all"):
        args.samples = args.samples or 256
        part_resnet(args)
    if args.part == "all":
        subprocess.run([sys.executable, __file__, "--part", "mobilenet", "--samples", "8"], check=True)
    elif args.part == "mobilenet":
        args.samples = args.samples or 8
        part_mobilenet(args)


if __name__ == "__main__":
    main()

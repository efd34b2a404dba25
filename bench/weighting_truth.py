"""Which noise-gain weighting ranks activation sites by the damage of the loop's next step?

The loop's activation phase lowers the least sensitive sites by one bit. This measures, for every activation site
of a model at ``--bits`` (float weights, every site at B bits, clips as ``--act-clip mse`` sets them), the damage
of lowering that site alone to B-1 bits (its clip refitted at B-1): the increase of the mean KL divergence from the
float model's softmax over ``--images`` test images. Then the Spearman rank correlation of each weighting's M
(``impq_onnx.sensitivity`` on ``--samples`` training images, the plan at B bits) with that damage.

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp
    .venv/bin/python bench/weighting_truth.py models/mobilenet-v1-cifar10/model.onnx --data /tmp/cifar10
    .venv/bin/python bench/weighting_truth.py models/resnet20-cifar10/swa/model.onnx --data /tmp/cifar10
    .venv/bin/python bench/weighting_truth.py models/fashion-mnist/model.onnx --data models/fashion-mnist
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import impq_onnx
from impq_onnx.data.model_data import open_model_data
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.simulate import as_proto, calibrate_clips, fit_clips_mse, simulate
from impq_onnx.runtime import inference_session

WEIGHTINGS = ("paper", "reference", "step", "measured")


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True, help="ImageFolder with train/ and test/ (or the bundled layout)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--images", type=int, default=2000, help="test images for the damage")
    parser.add_argument("--samples", type=int, default=256, help="training images for the noise gain")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    start = time.perf_counter()
    model = impq_onnx.load(args.model)
    data = open_model_data(model, args.data, None)
    sites = find_sites(model, (1, *data.evaluation.sample_shape))
    names = [site.tensor for site in sites.activations]

    def batches():
        return data.train.batches(128, shuffle=True, seed=0)

    plan = calibrate_clips(model, PrecisionPlan.uniform(sites, None, args.bits), sites, batches(),
                           threads=args.threads)
    plan = fit_clips_mse(model, plan, sites, names, batches(), threads=args.threads)
    images = []
    for batch in data.evaluation.batches(250):
        images.append(np.asarray(batch[0], np.float32))
        if sum(len(x) for x in images) >= args.images:
            break
    x = np.concatenate(images)[: args.images]

    def logits(proto) -> np.ndarray:
        session = inference_session(proto.SerializeToString(), args.threads)
        name = session.get_inputs()[0].name
        return np.concatenate([session.run(None, {name: x[i : i + 250]})[0] for i in range(0, len(x), 250)])

    reference = log_softmax(logits(as_proto(model)))
    p = np.exp(reference)

    def kl(z: np.ndarray) -> float:
        return float(np.mean(np.sum(p * (reference - log_softmax(z)), axis=1)))

    base = kl(logits(simulate(model, plan, sites)))
    damage = {}
    for name in names:
        lower = plan.copy()
        lower.activations[name] = args.bits - 1
        lower = fit_clips_mse(model, lower, sites, [name], batches(), threads=args.threads)
        damage[name] = kl(logits(simulate(model, lower, sites))) - base
    truth = [damage[name] for name in names]
    print(f"{args.model}: {len(names)} activation sites at A{args.bits} (float weights, mse clips), KL "
          f"{base:.4f} on {len(x)} test images; damage = KL increase with one site at A{args.bits - 1}")
    ranks = {}
    for weighting in WEIGHTINGS:
        table = impq_onnx.sensitivity(model, args.data, plan=plan, weighting=weighting, samples=args.samples,
                                      threads=args.threads)
        scores = [table.activations[name] for name in names]
        ranks[weighting] = np.argsort(np.argsort(scores))
        print(f"  {weighting:>9}: Spearman with the damage {spearman(scores, truth):+.3f}")
    seconds = time.perf_counter() - start
    print(f"  sites, least damaged first (rank of each weighting's M, 0 = least sensitive), {seconds:.0f} s:")
    for i in np.argsort(truth):
        print(f"    {names[i]:<28} damage {truth[i]:+.4f}  "
              + "  ".join(f"{w} {int(ranks[w][i]):>2}" for w in WEIGHTINGS))


if __name__ == "__main__":
    main()

"""The activation clip alone, calibration only: float weights, every activation site at B bits, with the clip of
``--act-clip paper`` (batch-norm rule, else the 99.9th percentile), the 99.9th percentile everywhere (uniform-ptq's
rule) and ``--act-clip mse`` (least squared error at the bits). Prints test top-1 and agreement with the float model.

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp
    .venv/bin/python bench/act_clip.py models/mobilenet-v1-cifar10/model.onnx --data /tmp/cifar10 --bits 4,3
"""

from __future__ import annotations

import argparse

import impq_onnx
from impq_onnx.data.model_data import open_model_data
from impq_onnx.engine import evaluate
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.simulate import calibrate_clips, fit_clips_mse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True, help="ImageFolder with train/ and test/")
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = impq_onnx.load(args.model)
    data = open_model_data(model, args.data, None)
    sites = find_sites(model, (1, *data.evaluation.sample_shape))

    def batches():
        return data.train.batches(128, shuffle=True, seed=0)

    for bits in (int(b) for b in args.bits.split(",")):
        plan = PrecisionPlan.uniform(sites, None, bits)
        paper = calibrate_clips(model, plan, sites, batches(), threads=args.threads)
        percentile = calibrate_clips(model, plan, sites, batches(), threads=args.threads, only_missing=False)
        mse = fit_clips_mse(model, paper, sites, [s.tensor for s in sites.activations], batches(), threads=args.threads)
        for name, clipped in (("paper", paper), ("99.9th percentile", percentile), ("mse", mse)):
            r = evaluate(model, data.evaluation.batches(250), plan=clipped, sites=sites, float_model=model,
                         threads=args.threads, progress=False)
            top1, agree = 100 * (r.top1 or 0.0), 100 * (r.agreement or 0.0)
            print(f"{args.model} A{bits} {name}: test top-1 {top1:.2f} % agreement {agree:.2f} % "
                  f"(n={r.n})", flush=True)


if __name__ == "__main__":
    main()

"""Do two refits of one plan from the same float weights land in one basin? Their average, scored (issue 23).

Every 1.74-bit refit of the seed-0 plan starts from the float SWA weights; they differ in their rate, their
schedule or the machine's last bits, and end 0.1–0.5 points apart on test. If their latent (float) weights can
be averaged, quantized under the plan and still score at least as well as each ("model soups": fine-tunes of one
pretrained model average well), two shorter refits averaged are a candidate for the 40-epoch budget. This takes
finished refits' last weights (``<stem>.work/refit/weights-<steps>.npz``, all under the same ``<stem>.plan.yaml``),
scores each, then their mean with the running statistics averaged, then the mean with its batch-norm statistics
re-estimated over one epoch of augmented training batches through the simulated model (as
``--refit-average-epochs`` does for its average):

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp
    .venv/bin/python bench/soup.py bench/runs/resnet20-swa/swa-kernel-174-rms-ep1-refit30 \\
        bench/runs/resnet20-swa/swa-kernel-174-rms-ep1-rlr005-refit30 \\
        --model models/resnet20-cifar10/swa/model.onnx --data /tmp/cifar10 --seed 0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from impq_onnx.engine import batchnorm_statistics
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.simulate import simulate
from impq_onnx.search.iteration import with_values

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refit_weights import add_arguments, finished_refit, load_last_weights  # noqa: E402  (the same loading and scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("others", nargs="+", help="more refits' stems under the same plan")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    last = load_last_weights(args)
    plans = {PrecisionPlan.load(f"{stem}.plan.yaml").to_yaml() for stem in [args.stem, *args.others]}
    if len(plans) != 1:
        sys.exit("the refits' plans differ: an average needs one plan")
    soup = [last.values, *(finished_refit(stem)[1] for stem in args.others)]
    if any(set(v) != set(last.values) for v in soup):
        sys.exit("the refits' checkpoints hold different parameters")
    for stem, values in zip([args.stem, *args.others], soup, strict=True):
        print(f"{stem}: {last.score(values)}", flush=True)
    mean = {name: np.mean([v[name] for v in soup], axis=0).astype(last.values[name].dtype) for name in last.values}
    print(f"mean of {len(soup)}, statistics averaged: {last.score(mean)}", flush=True)
    start = time.perf_counter()
    batches = last.data.train.batches(args.batch_size, shuffle=True, seed=7, augment=True, drop_last=True)
    statistics = batchnorm_statistics(simulate(with_values(last.base, mean), last.plan, last.sites), batches,
                                      threads=args.threads)
    print(f"mean of {len(soup)}, statistics re-estimated on one augmented epoch: "
          f"{last.score({**mean, **statistics})}; {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""Does re-estimating a finished refit's batch-norm statistics over a whole epoch move its scores? (issue 23)

``--batchnorm train`` leaves each batch-norm's running statistics as an exponential average (momentum 0.9) of the
last batches' statistics. This takes a finished refit's last weights (``<stem>.work/refit/weights-<steps>.npz``)
under ``<stem>.plan.yaml``, re-estimates the statistics over one epoch of training batches through the simulated
model (:func:`impq_onnx.engine.batchnorm_statistics`, what ``--refit-average-epochs`` does for its average), with
and without the CIFAR augmentation, and prints validation (compress's split for ``--seed``) and test top-1 /
agreement before and after:

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp
    .venv/bin/python bench/bn_reestimate.py bench/runs/resnet20-swa/swa-kernel-174-rms-ep1-refit30 \\
        --model models/resnet20-cifar10/swa/model.onnx --data /tmp/cifar10 --seed 0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from impq_onnx.engine import batchnorm_statistics
from impq_onnx.quant.simulate import simulate
from impq_onnx.search.iteration import with_values

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refit_weights import add_arguments, load_last_weights  # noqa: E402  (the same loading and scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    last = load_last_weights(args)
    print(f"as written: {last.score(last.values)}", flush=True)
    simulated = simulate(with_values(last.base, last.values), last.plan, last.sites)  # batchnorm_statistics copies it
    for augment in (False, True):
        start = time.perf_counter()
        batches = last.data.train.batches(args.batch_size, shuffle=True, seed=7, augment=augment, drop_last=True)
        statistics = batchnorm_statistics(simulated, batches, threads=args.threads)
        print(f"statistics re-estimated on one epoch, augment {augment}: {last.score({**last.values, **statistics})}; "
              f"{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()

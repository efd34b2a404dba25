"""Does re-estimating a finished refit's batch-norm statistics over a whole epoch move its scores? (issue 23)

``--batchnorm train`` leaves each batch-norm's running statistics as an exponential average (momentum 0.9) of the
last batches' statistics. This takes a finished refit's last weights (``<stem>.work/refit/weights-<steps>.npz``)
under ``<stem>.plan.yaml``, re-estimates the statistics over one epoch of training batches through the simulated
model (:func:`impq_onnx.engine.recompute_batchnorm`, what ``--refit-average-epochs`` does for its average), with and
without the CIFAR augmentation, and prints validation (compress's split for ``--seed``) and test top-1 / agreement
before and after:

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp
    .venv/bin/python bench/bn_reestimate.py bench/runs/resnet20-swa/swa-kernel-174-rms-ep1-refit30 \\
        --model models/resnet20-cifar10/swa/model.onnx --data /tmp/cifar10 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from onnx import numpy_helper

import impq_onnx
from impq_onnx.data.model_data import open_model_data
from impq_onnx.engine import recompute_batchnorm
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.simulate import simulate
from impq_onnx.search.checkpoint import read_values
from impq_onnx.search.iteration import with_values

sys.path.insert(0, str(Path(__file__).resolve().parent))
from polish import float_classes, score_line  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stem", help="a compress output with a finished refit, without its suffix")
    parser.add_argument("--model", required=True, help="the input float model (the refit's base, the agreement)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (its validation split)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=None, help="a decoded-image cache folder (a work dir's decoded/)")
    args = parser.parse_args()
    work = Path(f"{args.stem}.work")
    done = json.loads((work / "refit" / "refit.json").read_text(encoding="utf-8"))["done"]
    base = impq_onnx.load(args.model)
    plan = PrecisionPlan.load(f"{args.stem}.plan.yaml")
    values = read_values(work / "refit" / f"weights-{done}.npz", work)
    data = open_model_data(base, args.data, None, val_fraction=args.val_fraction, seed=args.seed,
                           cache_dir=args.cache)
    sites = find_sites(base, (1, *data.preprocess.sample_shape))
    parts = {"val": data.val, "test": data.test}
    reference = float_classes(base, parts, args.threads)
    written = score_line(with_values(base, values), parts, reference, args.threads, plan=plan, sites=sites)
    print(f"as written: {written}", flush=True)
    for augment in (False, True):
        start = time.perf_counter()
        simulated = simulate(with_values(base, values), plan, sites)
        names = {n for node in simulated.graph.node if node.op_type == "BatchNormalization" for n in node.input[3:5]}
        batches = data.train.batches(args.batch_size, shuffle=True, seed=7, augment=augment, drop_last=True)
        updated = recompute_batchnorm(simulated, batches, threads=args.threads)
        statistics = {t.name: numpy_helper.to_array(t) for t in updated.graph.initializer if t.name in names}
        model = with_values(base, {**values, **statistics})
        print(f"statistics re-estimated on one epoch, augment {augment}: "
              f"{score_line(model, parts, reference, args.threads, plan=plan, sites=sites)}; "
              f"{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()

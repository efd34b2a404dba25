"""The data part of ``impq-onnx sensitivity``: open the folder, check, and decode the measured images.

    PYTHONPATH=<checkout> .venv/bin/python bench/sensitivity_data_part.py /tmp/cifar10/test [--samples 2048]

Prints the wall and CPU seconds of the imports + model load and of opening the data and decoding a
seeded subset of ``--samples`` images in batches of 64, the way the sensitivity command does it in
the checkout on ``PYTHONPATH`` (before branch speed: every image checked, the subset decoded on one
thread; after: only the subset decoded, on every core). Run it for both checkouts, interleaved.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--model", default=str(ROOT / "models" / "resnet20-cifar10" / "swa" / "model.onnx"))
    args = parser.parse_args()
    t0, c0 = time.perf_counter(), time.process_time()
    from impq_onnx.data.model_data import open_model_data
    from impq_onnx.frontend.canonical import load

    canonical = load(args.model)
    t1, c1 = time.perf_counter(), time.process_time()
    new = "check" in open_model_data.__code__.co_varnames
    options = dict(check=False, workers=2) if new else {}
    dataset = open_model_data(canonical, args.data, **options).train_all
    subset = dataset.subset(np.sort(np.random.default_rng(0).choice(len(dataset), args.samples, replace=False)))
    n = sum(len(x) for x, _ in subset.batches(64))
    t2, c2 = time.perf_counter(), time.process_time()
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "n/a"
    print(f"{'after' if new else 'before'}: imports + model load {t1 - t0:.2f} s wall {c1 - c0:.2f} s CPU; "
          f"open + check + decode {n} images {t2 - t1:.2f} s wall {c2 - c1:.2f} s CPU (load {load})")


if __name__ == "__main__":
    main()

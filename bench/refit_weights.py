"""Validation and test scores of a refit's last weights, beside what compress wrote (issue 23).

``compress --refit-average-epochs K`` writes the average of the refit's last K epochs when it validates at least
as well as the last weights; ``report.json`` gives both validation figures but only the written model's test
figure. This scores the last weights (``<work dir>/refit/weights-<steps>.npz``, the checkpoint of the refit's
last part) under the output's plan on compress's validation split (``--seed``, ``--val-fraction``) and on the
test images, with agreement against the float model, so a controlled comparison of averaging can give both
models' test scores from one run:

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp
    .venv/bin/python bench/refit_weights.py bench/runs/resnet20-swa/swa-kernel-174-rms-ep1-avg8-refit30 \\
        --model models/resnet20-cifar10/swa/model.onnx --data /tmp/cifar10 --seed 0

``--write STEM`` also writes the last weights as a float model with the plan beside it, so ``bench/polish.py STEM``
fine-tunes on from them (the frozen batch-norm screen of ``bench/results/candidates.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import impq_onnx
from impq_onnx.data.model_data import open_model_data
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.search.checkpoint import read_values
from impq_onnx.search.iteration import with_values

sys.path.insert(0, str(Path(__file__).resolve().parent))
from polish import float_classes, score_line  # noqa: E402


@dataclasses.dataclass
class LastWeights:
    """A finished refit's last weights with what scoring them needs (also used by ``bench/bn_reestimate.py``)."""

    base: Any
    plan: Any  # the output's plan with the last part's clips
    values: dict[str, np.ndarray]
    data: Any
    sites: Any
    parts: dict[str, Any]  # val, test
    reference: dict[str, Any]  # the float model's classes per part
    threads: int

    def score(self, values: dict[str, np.ndarray]) -> str:
        """Top-1 and agreement per part of base + ``values`` under the plan, as one line."""
        return score_line(with_values(self.base, values), self.parts, self.reference, self.threads, plan=self.plan,
                          sites=self.sites)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stem", help="a compress output without its suffix (<stem>.plan.yaml, <stem>.work/refit)")
    parser.add_argument("--model", required=True, help="the input float model (the refit's base, the agreement)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (its validation split)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=None, help="a decoded-image cache folder [default: <stem>.work/decoded "
                                                      "when there]")


def finished_refit(stem: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``refit.json`` and the last weights of ``<stem>.work/refit``, whose refit must have finished."""
    work = Path(f"{stem}.work")
    progress = json.loads((work / "refit" / "refit.json").read_text(encoding="utf-8"))
    if progress.get("result") is None:
        sys.exit(f"{work / 'refit'}: the refit has not finished (step {progress['done']} of {progress['steps']})")
    return progress, read_values(work / "refit" / f"weights-{progress['done']}.npz", work)


def load_last_weights(args: argparse.Namespace) -> LastWeights:
    """The refit of ``args.stem`` (:func:`add_arguments`), which must have finished."""
    work = Path(f"{args.stem}.work")
    progress, values = finished_refit(args.stem)
    base = impq_onnx.load(args.model)
    # the last part's clips (learned clips: refit.json's ``clips``), not the average's the written plan may hold
    plan = PrecisionPlan.load(f"{args.stem}.plan.yaml").with_clips(progress.get("clips", {}))
    cache = args.cache or (work / "decoded" if (work / "decoded").is_dir() else None)
    data = open_model_data(base, args.data, None, val_fraction=args.val_fraction, seed=args.seed, cache_dir=cache)
    sites = find_sites(base, (1, *data.preprocess.sample_shape))
    parts = {"val": data.val, "test": data.test}
    return LastWeights(base, plan, values, data, sites, parts, float_classes(base, parts, args.threads), args.threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--write", default=None, metavar="STEM",
                        help="also write STEM.float.onnx (the last weights) and STEM.plan.yaml: polish.py's input")
    args = parser.parse_args()
    start = time.perf_counter()
    last = load_last_weights(args)
    print(f"{args.stem}: the refit's last weights: {last.score(last.values)}; {time.perf_counter() - start:.0f} s",
          flush=True)
    if args.write:  # bench/polish.py's input: the last weights as a float model, the plan beside it
        Path(f"{args.write}.float.onnx").write_bytes(with_values(last.base, last.values).to_bytes())
        last.plan.save(f"{args.write}.plan.yaml")
        print(f"wrote {args.write}.float.onnx and {args.write}.plan.yaml", flush=True)


if __name__ == "__main__":
    main()

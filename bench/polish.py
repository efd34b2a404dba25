"""Does fine-tuning a finished compress run longer, at its final plan, gain anything? (issue 23)

Takes a finished run's ``<stem>.float.onnx`` (the fine-tuned weights) and ``<stem>.plan.yaml``, fine-tunes
``--epochs`` more under that plan the way compress does (distillation from the original model, the CIFAR
augmentation, cosine from ``--lr`` to 0, batch-norm frozen), and prints validation (compress's split for
``--seed``/``--val-fraction``) and test top-1 / agreement before and after.

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp
    .venv/bin/python bench/polish.py /tmp/runs/mbv1-meas/mbv1-w4a4-measured \\
        --model models/mobilenet-v1-cifar10/model.onnx --data /tmp/cifar10 --seed 0 --epochs 4 --lr 0.0005

A long fine-tune spans sessions with ``--checkpoint DIR``: it runs in parts of one epoch (``--part-steps``) and
saves the weights and SGD momentum after each; the same command resumes after the last part. Parts compute what
one call does (11 steps in parts of 3, and once more read back from DIR: the same weights' sha256 as one call,
e0635360bef10ed9, 2026-12-07); a DIR written with other options or inputs is refused.

``compress --refit-epochs N`` is this script's fixed-plan fine-tune from float inside compress, with the same seeds:
the seed-0 ep1 plan below at 1 epoch gave the same four figures through both (validation 93.42 / 95.16 %, test
87.66 / 93.67 %; ``bench/results/candidates.md``).

(``/tmp/runs/mbv1-meas/mbv1-w4a4-measured.onnx`` written by the MobileNet-V1 command of ``bench/runs/README.md``:
the committed outputs leave out the 3.3 MB ``.float.onnx``.) A ``<stem>`` whose ``.float.onnx`` is the float
model and whose plan is any plan makes it a fixed-plan fine-tune from float (``bench/results/candidates.md``). Issue
23's 1.74-bit recipe (a 7-epoch search's plan, 30 epochs from float: 88.98 % test at seed 0, 0.29 below float):

    cp models/resnet20-cifar10/swa/model.onnx /tmp/qat/ep1.float.onnx
    cp bench/runs/resnet20-swa/swa-kernel-174-rms-ep1.plan.yaml /tmp/qat/ep1.plan.yaml
    .venv/bin/python bench/polish.py /tmp/qat/ep1 --model models/resnet20-cifar10/swa/model.onnx \\
        --data /tmp/cifar10 --seed 0 --epochs 30 --lr 0.01 --batchnorm train
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
from pathlib import Path

import numpy as np

import impq_onnx
from impq_onnx.data.dataset import derive_seed
from impq_onnx.data.model_data import open_model_data
from impq_onnx.engine import evaluate, fine_tune
from impq_onnx.engine.evaluation import predicted_classes
from impq_onnx.files import write_atomic
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.search.checkpoint import values_from_bytes, values_to_bytes
from impq_onnx.search.iteration import with_values


def epoch_batches(train, seed: int, batch_size: int, epochs: float, augment: bool = True, first_epoch: int = 0):
    """``(batches, steps)`` for ``fine_tune``: shuffled batches (augmented as compress's ``--augment`` does unless
    ``augment`` is False) with a new seeded order per epoch, from epoch ``first_epoch`` on, and the steps of
    ``epochs`` passes (also used by ``bench/lsq_screen.py``)."""
    epoch = [first_epoch]

    def batches():
        order = derive_seed(seed, 10_000, "polish", epoch[0])
        epoch[0] += 1
        return train.batches(batch_size, shuffle=True, seed=order, augment=augment, drop_last=True)

    return batches, max(1, round(epochs * (len(train) // batch_size)))


def float_classes(teacher, parts: dict, threads: int) -> dict:
    """The float model's classes per split, computed once for every agreement figure on it."""
    return {name: predicted_classes(teacher, part.batches(250), threads=threads) for name, part in parts.items()}


def score_line(model, parts: dict, reference: dict, threads: int, **simulation) -> str:
    """Top-1 and agreement with ``reference`` per split, as one line; ``simulation``: ``plan`` and ``sites`` for a
    float model evaluated under a plan (none for a model that is already simulated)."""
    out = []
    for name, part in parts.items():
        r = evaluate(model, part.batches(250), float_classes=reference[name], threads=threads, **simulation)
        out.append(f"{name} top-1 {100 * r.top1:.2f} % agreement {100 * r.agreement:.2f} %")
    return ", ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stem", help="a compress output without its suffix (<stem>.float.onnx, <stem>.plan.yaml)")
    parser.add_argument("--model", required=True, help="the original float model (the teacher, the agreement)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (its validation split)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="compress's split for --seed; 0: fine-tune on every training image, score test only")
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--lr", type=float, default=0.0005)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batchnorm", default="frozen", choices=("frozen", "train"),
                        help="compress's --batchnorm (the ResNet-20 1.74-bit runs used train)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="compress's --weight-decay")
    parser.add_argument("--temperature", type=float, default=1.0, help="the distillation temperature")
    parser.add_argument("--label-mix", type=float, default=0.0,
                        help="the labels' share of the distillation target (0: the teacher alone)")
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"), help="compress's --optimizer")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="fine-tune on the training images as they are (no random crop and flip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=None, help="a decoded-image cache folder (a work dir's decoded/)")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="fine-tune in parts (SGD), saving the weights and momentum in DIR after each; run again "
                             "with the same options to resume after the last part (the same numbers as one call)")
    parser.add_argument("--part-steps", type=int, default=0, help="steps per part with --checkpoint (0: one epoch)")
    args = parser.parse_args()
    start = time.perf_counter()
    teacher = impq_onnx.load(args.model)
    tuned = impq_onnx.load(f"{args.stem}.float.onnx")
    plan = PrecisionPlan.load(f"{args.stem}.plan.yaml")
    data = open_model_data(teacher, args.data, None, val_fraction=args.val_fraction, seed=args.seed,
                           cache_dir=args.cache)
    sites = find_sites(tuned, (1, *data.preprocess.sample_shape))

    # with --val-fraction 0 nothing is held out: the validation split is the training set, and only test is scored
    parts = {"test": data.test} if args.val_fraction == 0 else {"val": data.val, "test": data.test}
    reference = float_classes(teacher, parts, args.threads)  # once, for the agreement before and after

    def scores(model) -> str:
        return score_line(model, parts, reference, args.threads, plan=plan, sites=sites)

    print(f"{args.stem}: as written: {scores(tuned)}", flush=True)
    batches, steps = epoch_batches(data.train, args.seed, args.batch_size, args.epochs, args.augment)
    options = dict(lr=args.lr, optimizer=args.optimizer, label_mix=args.label_mix, distill=True, teacher=teacher,
                   weight_decay=args.weight_decay, temperature=args.temperature, batchnorm=args.batchnorm,
                   threads=args.threads, seed=derive_seed(args.seed, 10_000, "fine-tune"), progress=False)
    if args.checkpoint:
        values = fine_tune_in_parts(args, tuned, plan, sites, data.train, steps, options)
    else:
        values = fine_tune(tuned, plan, sites, batches, steps=steps, **options).values
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(values[k], np.float32).tobytes()
                                     for k in sorted(values))).hexdigest()[:16]
    print(f"{args.stem}: fine-tuned weights sha256 {digest}", flush=True)
    polished = with_values(tuned, values)
    print(f"{args.stem}: +{args.epochs:g} epochs at lr {args.lr:g}, batch-norm {args.batchnorm}, "
          f"{args.optimizer}, weight decay {args.weight_decay:g}, temperature {args.temperature:g}, "
          f"label mix {args.label_mix:g}, augment {'on' if args.augment else 'off'} ({steps} steps): "
          f"{scores(polished)}; {time.perf_counter() - start:.0f} s", flush=True)


CHECKPOINT_SETTINGS = ("seed", "val_fraction", "epochs", "lr", "batch_size", "batchnorm", "weight_decay",
                       "temperature", "label_mix", "optimizer", "threads", "augment", "part_steps")


def skipping(batches, skip: int):
    """``batches`` (a callable giving one epoch's batches per call) whose first epoch starts ``skip`` batches in."""
    first = [True]

    def skipped():
        stream = batches()
        if first[0]:
            first[0] = False
            return itertools.islice(stream, skip, None)
        return stream

    return skipped


def fine_tune_in_parts(args, tuned, plan, sites, train, steps: int, options: dict) -> dict:
    """``fine_tune`` of ``steps`` steps as consecutive parts (one epoch, or ``--part-steps``), each from the last
    part's weights and SGD momentum, which ``--checkpoint`` holds after every part (``polish.json``,
    ``weights-<step>.npz``, ``velocity-<step>.npz``; only the last part's are kept); returns the trained values."""
    if args.optimizer != "sgd":
        raise SystemExit(f"--checkpoint needs --optimizer sgd ({args.optimizer}'s state stays inside onnxruntime)")
    folder = Path(args.checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    per_epoch = max(1, len(train) // args.batch_size)
    part = args.part_steps or per_epoch
    if part % per_epoch and per_epoch % part:
        raise SystemExit(f"--part-steps {part}: give a divisor or a multiple of the {per_epoch} steps of an epoch")
    inputs = {name: hashlib.sha256(Path(f"{args.stem}{suffix}").read_bytes()).hexdigest()
              for name, suffix in (("float", ".float.onnx"), ("plan", ".plan.yaml"))}
    inputs["model"] = hashlib.sha256(Path(args.model).read_bytes()).hexdigest()
    settings = {**{key: getattr(args, key) for key in CHECKPOINT_SETTINGS}, "steps": steps, "inputs": inputs}
    record = folder / "polish.json"
    done, losses, values, velocity = 0, [], {}, {}
    if record.exists():
        saved = json.loads(record.read_text())
        if saved["settings"] != settings:
            differs = sorted(k for k in settings if saved["settings"].get(k) != settings[k])
            raise SystemExit(f"{record}: written by a fine-tune with other {', '.join(differs)}; give the same "
                             "options and inputs, or another --checkpoint folder")
        done, losses = saved["done"], saved["losses"]
        values = values_from_bytes((folder / f"weights-{done}.npz").read_bytes())
        velocity = values_from_bytes((folder / f"velocity-{done}.npz").read_bytes())
        print(f"{record}: resuming after step {done} of {steps}", flush=True)
    while done < steps:
        tick, stop = time.perf_counter(), min(steps, done + part)
        batches, _ = epoch_batches(train, args.seed, args.batch_size, args.epochs, args.augment,
                                   first_epoch=done // per_epoch)
        if done % per_epoch:  # a part that starts inside an epoch skips what the last parts used of it
            batches = skipping(batches, done % per_epoch)
        trained = fine_tune(with_values(tuned, values), plan, sites, batches, steps=steps, start_step=done,
                            stop_step=stop, velocity=velocity, **options)
        values, done = {**values, **trained.values}, stop
        losses.append(float(np.mean(trained.losses)))
        write_atomic(folder / f"weights-{done}.npz", values_to_bytes(values))
        write_atomic(folder / f"velocity-{done}.npz", values_to_bytes(velocity))
        write_atomic(record, json.dumps({"settings": settings, "done": done, "losses": losses}, indent=1).encode())
        for old in folder.glob("*-*.npz"):
            if old.name not in (f"weights-{done}.npz", f"velocity-{done}.npz"):
                old.unlink()
        print(f"{record}: step {done}/{steps}, mean loss {losses[-1]:.6f}, {time.perf_counter() - tick:.0f} s",
              flush=True)
    return values


if __name__ == "__main__":
    main()

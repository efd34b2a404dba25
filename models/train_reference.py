"""Train a reference architecture from scratch with impq-onnx's own engine (onnxruntime-training).

    # bundled default: Fashion-MNIST (Debian package dataset-fashion-mnist)
    python models/make_fashion_subset.py --full-npz /tmp/fmnist
    python models/train_reference.py fashion_net --train /tmp/fmnist/train.npz --test /tmp/fmnist/test.npz \
        --epochs 4 --lr 0.05 --batch-size 128 -o models/fashion-mnist/model.onnx

    # ResNet-20 and MobileNet-V1 (32x32) on CIFAR-10 (the images stay in ../shared/data; extract them outside the repo)
    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp
    python models/train_reference.py resnet20 --train /tmp/cifar10/train --test /tmp/cifar10/test \
        --epochs 40 --lr 0.1 --batch-size 128 --augment -o models/resnet20-cifar10/model.onnx
    python models/train_reference.py mobilenet_v1_cifar --width 0.5 --train /tmp/cifar10/train \
        --test /tmp/cifar10/test --epochs 20 --lr 0.1 --batch-size 128 --augment \
        -o models/mobilenet-v1-cifar10/model.onnx
    python models/split_external.py models/mobilenet-v1-cifar10/model.onnx  # committed files stay under 2 MB

Training runs epoch by epoch; after each epoch the weights and a JSON state are written atomically to
``<output>.work/`` so a killed run continues with ``--resume``. The learning rate follows a cosine over
epochs (linear warm-up in the first epoch); SGD with Nesterov-free momentum 0.9 and weight decay 5e-4
(``--weight-decay``); ``--replicas 2`` trains data-parallel (``impq_onnx.engine.replicas``).
A log line per epoch goes to stdout and to ``<output>.log``.

``--average-from K`` averages the weights at the end of epochs K..N (stochastic weight averaging,
Izmailov et al. 2018; after an ``--init`` model, with ``--lr-schedule constant``, or ``cyclic``: every
epoch anneals from ``--lr`` to ``--min-lr``, so each averaged snapshot is taken at a low rate): after each of
those epochs the average, with its batch-norm statistics re-estimated on ``BATCHNORM_BATCHES`` training
batches (augmented as training is), is evaluated too (``average_top1`` in the log), and the output is that average.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import click
import numpy as np
import onnx

from impq_onnx import architectures, find_sites, from_proto
from impq_onnx.data import PRESETS, open_dataset
from impq_onnx.engine import evaluate, fine_tune, recompute_batchnorm

ARCHITECTURES = {"resnet20": ("cifar", architectures.resnet20),
                 "fashion_net": ("fashion-mnist", architectures.fashion_net),
                 "mobilenet_v1_cifar": ("cifar", architectures.mobilenet_v1_cifar)}
WIDTH_MULTIPLIER = {"mobilenet_v1_cifar"}  # builders that take --width


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


BATCHNORM_BATCHES = 100  # training batches that re-estimate the averaged model's batch-norm statistics


def _average_with_batchnorm(average, train, batch_size: int, seed: int, augment: bool, threads: int, label: str):
    batches = train.batches(batch_size, shuffle=True, seed=seed, augment=augment, drop_last=True)
    return from_proto(recompute_batchnorm(average, batches, threads=threads, max_batches=BATCHNORM_BATCHES),
                      label=label)


def _update_average(average, model, count: int):
    """Running mean of the float initializers: ``average + (model - average) / (count + 1)``."""
    if average is None:
        return model
    proto = average.to_proto()
    current = {t.name: onnx.numpy_helper.to_array(t) for t in model.to_proto().graph.initializer}
    for i, t in enumerate(proto.graph.initializer):
        if t.data_type == onnx.TensorProto.FLOAT and t.name in current:
            a = onnx.numpy_helper.to_array(t).astype(np.float64)
            a += (current[t.name].astype(np.float64) - a) / (count + 1)
            proto.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(a.astype(np.float32), t.name))
    return from_proto(proto, label=average.label)


# Options that may change between a run and its --resume: they do not change what is trained.
_RESUMABLE_FREELY = {"resume", "threads", "output"}


def _check_same_options(state_path: Path, command: str | None, params: dict) -> None:
    """Refuse to resume a run written with other training options (epochs, lr, data, ...): the
    learning-rate schedule and the shuffles depend on them, so the result would be neither run's."""
    if not command:
        return
    words = shlex.split(command)
    script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
    if script is None:
        return
    try:
        earlier = main.make_context("train_reference", words[script + 1 :], resilient_parsing=True).params
    except click.ClickException:
        return
    for key in sorted(set(params) - _RESUMABLE_FREELY):
        if key in earlier and earlier[key] != params[key]:
            option = next(o for o in main.params if o.name == key)
            flag = max(option.opts, key=len) if option.opts[0].startswith("-") else "the architecture"
            raise click.UsageError(
                f"{state_path} was written with {flag} {earlier[key]!r}, this run has {params[key]!r}; "
                "resume with the same options, or start afresh without --resume"
            )


@click.command()
@click.argument("architecture", type=click.Choice(sorted(ARCHITECTURES)))
@click.option("--train", "train_path", required=True, type=click.Path(exists=True))
@click.option("--test", "test_path", required=True, type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--epochs", default=30, show_default=True)
@click.option("--lr", default=0.1, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--augment/--no-augment", default=False, help="CIFAR-style random crop + flip.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from <output>.work/.")
@click.option("--init", "init_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Start from this model's weights instead of a fresh initialisation (a second, shorter "
                   "cosine stage after a first run).")
@click.option("--weight-decay", default=5e-4, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["cosine", "constant", "cyclic"]), default="cosine", show_default=True,
              help="cosine: from --lr to 0 over the epochs (a warm-up epoch first); constant: --lr throughout "
                   "(after the warm-up epoch); cyclic: every epoch a cosine from --lr to --min-lr (no warm-up).")
@click.option("--min-lr", default=0.0, show_default=True, help="The learning rate each cyclic epoch ends at.")
@click.option("--average-from", default=0, show_default=True, type=click.IntRange(min=0),
              help="Average the weights from the end of this epoch (1-based) on; the output is the average "
                   "with re-estimated batch-norm statistics (0: no averaging).")
@click.option("--replicas", default=1, show_default=True,
              help="Data-parallel onnxruntime sessions, each on its part of the batch (2 trains about 1.45x "
                   "faster on 2 cores; batch-norm statistics are then per part).")
@click.option("--width", default=None, type=float, help="Width multiplier (mobilenet_v1_cifar only) [default: 1.0].")
def main(architecture, train_path, test_path, output, epochs, lr, batch_size, augment, seed, threads, resume,
         weight_decay, replicas, width, init_path, lr_schedule, average_from, min_lr):
    preset_name, build = ARCHITECTURES[architecture]
    if average_from > epochs:
        raise click.UsageError(f"--average-from {average_from} is after the last epoch ({epochs})")
    if width is not None:
        if architecture not in WIDTH_MULTIPLIER:
            raise click.UsageError(f"--width applies to {', '.join(sorted(WIDTH_MULTIPLIER))}, not {architecture}")
        build = functools.partial(build, width=width)
    preprocess = PRESETS[preset_name]
    train = open_dataset(train_path, preprocess)
    test = open_dataset(test_path, preprocess)
    output = Path(output)
    work = output.with_name(output.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    state_path, log_path = work / "state.json", output.with_suffix(".log")

    canonical = from_proto(onnx.load(init_path) if init_path else build(seed=seed), label=architecture)
    start_epoch, history, average, averaged = 0, [], None, 0
    if resume and state_path.exists():
        state = json.loads(state_path.read_text())
        _check_same_options(state_path, state.get("command"), click.get_current_context().params)
        start_epoch, history, averaged = state["epoch"], state["history"], state.get("averaged", 0)
        canonical = from_proto(onnx.load(work / state.get("weights", "model.onnx")), label=architecture)
        if averaged:
            average = from_proto(onnx.load(work / state.get("average", "average.onnx")), label=architecture)
        print(f"resuming after epoch {start_epoch}", flush=True)
    if start_epoch == 0:  # a fresh start (with or without --resume) begins a fresh log
        log_path.write_text("")
    sites = find_sites(canonical)
    steps_per_epoch = len(train) // batch_size
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    def cosine(e: int) -> float:
        return lr * 0.5 * (1 + math.cos(math.pi * e / epochs))

    final = None  # the average with re-estimated batch-norm statistics, after the latest averaged epoch
    for epoch in range(start_epoch, epochs):
        epoch_lr = cosine(epoch) if lr_schedule == "cosine" else lr
        next_lr = {"cosine": cosine(epoch + 1), "constant": lr, "cyclic": min_lr}[lr_schedule]
        started = time.perf_counter()
        trained = fine_tune(
            canonical, None, sites,
            lambda e=epoch: train.batches(batch_size, shuffle=True, seed=seed * 1000 + e, augment=augment,
                                          drop_last=True),
            steps=steps_per_epoch, lr=epoch_lr, optimizer="sgd", momentum=0.9, weight_decay=weight_decay,
            warmup_steps=steps_per_epoch if epoch == 0 and lr_schedule != "cyclic" else 0,
            final_lr=next_lr,
            threads=threads, replicas=replicas, seed=seed + epoch, progress=False,
        )
        canonical = from_proto(trained.apply_to(canonical.to_proto()), label=architecture)
        result = evaluate(canonical, test.batches(256), threads=threads)
        row = {"epoch": epoch + 1, "lr": round(epoch_lr, 6), "loss": round(float(np.mean(trained.losses)), 4),
               "test_top1": round(100 * result.top1, 2), "train_img_per_s": round(trained.images_per_second, 1),
               "seconds": round(time.perf_counter() - started, 1)}
        if average_from and epoch + 1 >= average_from:
            average = _update_average(average, canonical, averaged)
            averaged += 1
            final = _average_with_batchnorm(average, train, batch_size, seed * 1000 + epoch, augment, threads,
                                            architecture)
            row["averaged"] = averaged
            row["average_top1"] = round(100 * evaluate(final, test.batches(256), threads=threads).top1, 2)
            row["seconds"] = round(time.perf_counter() - started, 1)
        history.append(row)
        # Checkpoint first, then report: a run killed after its epoch line always resumes after that epoch
        # (killed between the two, it repeats the epoch and the log gets the line twice). The weights go
        # to files named by epoch and state.json, written last, names them: a run killed before it
        # resumes from the previous epoch's files, never from this epoch's weights (or average).
        names = {"weights": f"model-{epoch + 1}.onnx"}
        _atomic_write(work / names["weights"], canonical.to_bytes())
        if average is not None:
            names["average"] = f"average-{epoch + 1}.onnx"
            _atomic_write(work / names["average"], average.to_bytes())
        _atomic_write(state_path, json.dumps({"epoch": epoch + 1, "history": history, "command": command,
                                              "averaged": averaged, **names}).encode())
        for stale in [*work.glob("model*.onnx"), *work.glob("average*.onnx")]:
            if stale.name not in names.values():
                stale.unlink()
        line = json.dumps(row)
        with open(log_path, "a") as log:  # the log before stdout: a reader of stdout finds the line logged
            log.write(line + "\n")
        print(line, flush=True)
    if average is not None:
        # The last epoch is always averaged (--average-from <= --epochs), so ``final`` is its average; a
        # run resumed after its last epoch trained nothing here and re-estimates it the same way.
        canonical = final if final is not None else _average_with_batchnorm(
            average, train, batch_size, seed * 1000 + epochs - 1, augment, threads, architecture)
    _atomic_write(output, canonical.to_bytes())
    top1 = history[-1]["average_top1" if average is not None else "test_top1"]
    print(f"wrote {output}: test top-1 {top1} %" + (f" (average of {averaged} epochs)" if average is not None else ""),
          flush=True)


if __name__ == "__main__":
    main()

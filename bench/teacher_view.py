"""``bench/polish.py`` with the teacher's view changed: a flip-averaged teacher, mixup'd inputs (issue 23 screens).

Every option of ``bench/polish.py`` plus:

- ``--flip-teacher``: the distillation target is the float model's distribution averaged over the image and its
  horizontal mirror, ``log(½ softmax(f(x)) + ½ softmax(f(flip x)))`` (the test-time-augmented teacher, a little
  better than the plain one and smoother);
- ``--mixup ALPHA``: each training batch becomes ``λ x + (1 − λ) x[perm]``, λ ~ Beta(α, α) per batch, a seeded
  permutation of the batch; with distillation the teacher scores the same mixed images ("function matching").

Both act on what ``fine_tune`` feeds, not on the engine: the flip teacher replaces the engine's
``training_target`` (the step's target from the teacher session) for this process, and mixup wraps
``polish.epoch_batches``. Not product code: screens whose results are in ``bench/results/candidates.md``
("The teacher's view"). The 1.74-bit seed-0 screen, 2 epochs from float:

    cp models/resnet20-cifar10/swa/model.onnx /tmp/qat/mix.float.onnx
    cp bench/runs/resnet20-swa/swa-kernel-174-rms-ep1.plan.yaml /tmp/qat/mix.plan.yaml
    .venv/bin/python bench/teacher_view.py /tmp/qat/mix --model models/resnet20-cifar10/swa/model.onnx \\
        --data /tmp/cifar10 --seed 0 --epochs 2 --lr 0.01 --batchnorm train --threads 1 --mixup 0.2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import impq_onnx.engine.replicas as replicas
import impq_onnx.engine.training as training

sys.path.insert(0, str(Path(__file__).resolve().parent))
import polish  # noqa: E402


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def flip_target(teacher, input_name: str, x: np.ndarray, y, label_mix: float, temperature: float):
    """``training_target`` with the teacher's distribution averaged over ``x`` and its mirror (NCHW: the last
    axis is the width), as logits whose softmax at ``temperature`` is that average."""
    if teacher is None:
        return y
    plain = teacher.run(None, {input_name: x})[0].astype(np.float64)
    mirrored = teacher.run(None, {input_name: np.ascontiguousarray(x[..., ::-1])})[0].astype(np.float64)
    p = 0.5 * (_softmax(plain / temperature) + _softmax(mirrored / temperature))
    logits = (temperature * np.log(np.maximum(p, 1e-30))).astype(np.float32)
    return replicas.distillation_target(logits, y, label_mix, temperature)  # unchanged without a label mix


def with_mixup(epoch_batches, alpha: float):
    """``polish.epoch_batches`` whose batches are mixed with a shuffled copy of themselves."""

    def mixed_epoch_batches(train, seed: int, batch_size: int, epochs: float, *args, **kwargs):
        batches, steps = epoch_batches(train, seed, batch_size, epochs, *args, **kwargs)
        rng = np.random.default_rng(seed + 12345)

        def mixed():
            for x, y in batches():
                lam = rng.beta(alpha, alpha)
                perm = rng.permutation(len(x))
                yield (lam * x + (1 - lam) * x[perm]).astype(np.float32), y

        return mixed, steps

    return mixed_epoch_batches


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)  # this script's options; the rest are polish.py's
    parser.add_argument("--flip-teacher", action="store_true")
    parser.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA")
    args, rest = parser.parse_known_args()
    if args.flip_teacher:  # training.py imports the name, so both modules' bindings are replaced
        replicas.training_target = training.training_target = flip_target
    if args.mixup > 0:
        polish.epoch_batches = with_mixup(polish.epoch_batches, args.mixup)
    print(f"teacher view: flip-averaged teacher {'on' if args.flip_teacher else 'off'}, mixup alpha {args.mixup:g}",
          flush=True)
    sys.argv[1:] = rest
    polish.main()

if __name__ == "__main__":
    main()

"""Would learned per-kernel steps or activation clips (LSQ-style) help at a fixed low-bit plan? A screen (issue 23).

Builds the fine-tune's simulated model for ``<stem>.float.onnx`` under ``<stem>.plan.yaml`` (as ``bench/polish.py``
does), then, with ``--learn-steps``, replaces each layer's step (the scheme's ``stat * factor``, cut from the
gradient) by a trainable per-kernel initializer holding the same values: ``step = k * p`` with ``k =
sqrt(1 / sqrt(N * Q))`` (``N`` the kernel's weights, ``Q = 2^(B-1)``), so plain SGD on ``p`` gives the step
LSQ's gradient scale ``1 / sqrt(N * Q)``. The quantizer stays ``q = (clip(rint(w / step - offset)) + offset) *
step`` with its straight-through rounding, so the step's gradient is LSQ's inside the range (``r + offset - w /
step``). Without ``--learn-steps`` it is the fixed-step fine-tune of ``bench/polish.py`` through the same code.
``--learn-clips`` trains the activation quantizers' steps instead, through the engine: ``fine_tune(...,
learn_clips=S)``, what ``compress --act-clip learned`` runs (a learned clip, PACT's idea in LSQ's form; ``k`` the
power of two nearest ``sqrt(S / sqrt(N * Q_p))``, :func:`impq_onnx.quant.quantizers.learned_step_factor`). The
candidates table's clip rows ran this script's own copy of that quantizer before the engine had it (``k`` not
rounded; main at d12b45d). Prints validation and test top-1 / agreement of the fine-tuned simulated model, and the
steps' or clips' mean change.

    .venv/bin/python bench/lsq_screen.py /tmp/qat/rms --model models/resnet20-cifar10/swa/model.onnx \\
        --data /tmp/cifar10 --seed 0 --epochs 2 --lr 0.01 --batchnorm train --learn-steps
    .venv/bin/python bench/lsq_screen.py /tmp/mbv1/s0 --model models/mobilenet-v1-cifar10/model.onnx \
        --data /tmp/cifar10 --seed 0 --epochs 2 --lr 0.0015 --batchnorm frozen --learn-clips --clip-lr-scale 30
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

import impq_onnx
import impq_onnx.engine.training as training
from impq_onnx.data.dataset import derive_seed
from impq_onnx.data.model_data import open_model_data
from impq_onnx.engine import fine_tune
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.quantizers import WIDE
from impq_onnx.quant.schemes import weight_scheme
from impq_onnx.quant.schemes.base import Grid, _kernel_shape
from impq_onnx.quant.simulate import simulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from polish import epoch_batches, float_classes, score_line  # noqa: E402  (bench/polish.py: same batches, scores)


def learnable_steps(proto: onnx.ModelProto, sites, plan: PrecisionPlan, lr_scale: float = 1.0,
                    clamp: bool = False) -> tuple[list[str], dict]:
    """Replace each layer's fixed step by ``Mul(p, k)``, ``p`` a new initializer; returns the names of the ``p``s
    and, per layer, ``(p name, k, initial step)``. ``lr_scale`` multiplies the step's gradient scale; ``clamp``:
    the clamped level's gradient is LSQ's (zero outside the range, for the weight and the step) instead of the
    straight-through identity."""
    scheme = weight_scheme(plan.weight_scheme)
    inits = {t.name: t for t in proto.graph.initializer}
    names, scales = [], {}
    for layer in sites.layers:
        div = next(n for n in proto.graph.node if n.op_type == "Div" and n.input[0] == layer.weight)
        step_name = div.input[1]
        w = numpy_helper.to_array(inits[layer.weight]).astype(np.float32)
        bits = plan.weights[layer.node]
        shape = _kernel_shape(w.ndim, layer.kernel_axis, w.shape[layer.kernel_axis])
        factor, _, _, _ = scheme._grids(bits, shape, Grid(1.0, 0.0, -WIDE, WIDE))
        step = scheme.step(scheme.statistic(w, layer.kernel_axis), factor)
        q = np.array([2.0 ** (b - 1) for b in bits], np.float32).reshape(shape)
        k = np.sqrt(lr_scale / np.sqrt(layer.kernel_params * q)).astype(np.float32)
        p_name, k_name, out = f"lsq/{layer.node}/p", f"lsq/{layer.node}/k", f"lsq/{layer.node}/step"
        proto.graph.initializer.extend([numpy_helper.from_array((step / k).astype(np.float32), p_name),
                                        numpy_helper.from_array(k, k_name)])
        for node in proto.graph.node:
            for i, name in enumerate(node.input):
                if name == step_name:
                    node.input[i] = out
        proto.graph.node.insert(list(proto.graph.node).index(div), helper.make_node("Mul", [p_name, k_name], [out],
                                                                                      name=f"lsq/{layer.node}/mul"))
        if clamp:
            _lsq_clamp(proto, layer.node)
        names.append(p_name)
        scales[layer.node] = (p_name, k, step)
    return names, scales


def _lsq_clamp(proto: onnx.ModelProto, node: str) -> None:
    """Feed the clamped level (``Max(Min(r, hi), lo)``) to what read the straight-through one (``level``)."""
    prefix = f"impq/{node}/"
    nodes = [n for n in proto.graph.node if n.output[0].startswith(prefix)]
    fq = next(n for n in nodes if n.op_type == "FakeQuant").output[0]
    low = next(n for n in nodes if n.op_type == "Min" and n.input[0] == fq).output[0]
    clamped = next(n for n in nodes if n.op_type == "Max" and n.input[0] == low).output[0]
    level = next(n for n in nodes if n.op_type == "Sub" and n.input[0] == fq and n.output[0].split("/")[-1]
                 .startswith("level")).output[0]
    for n in proto.graph.node:
        for i, name in enumerate(n.input):
            if name == level:
                n.input[i] = clamped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stem")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batchnorm", default="train", choices=("frozen", "train"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--learn-steps", action="store_true")
    parser.add_argument("--step-lr-scale", type=float, default=1.0, help="times LSQ's gradient scale of the steps")
    parser.add_argument("--lsq-clamp", action="store_true", help="LSQ's zero gradient outside the range")
    parser.add_argument("--learn-clips", action="store_true", help="learned activation steps (clips), LSQ's form")
    parser.add_argument("--clip-lr-scale", type=float, default=1.0, help="times LSQ's gradient scale of the clips")
    args = parser.parse_args()
    if args.learn_clips and args.learn_steps:
        parser.error("--learn-clips and --learn-steps: give one")
    start = time.perf_counter()
    teacher = impq_onnx.load(args.model)
    tuned = impq_onnx.load(f"{args.stem}.float.onnx")
    plan = PrecisionPlan.load(f"{args.stem}.plan.yaml")
    data = open_model_data(teacher, args.data, None, val_fraction=0.1, seed=args.seed)
    sites = find_sites(tuned, (1, *data.preprocess.sample_shape))
    batches, steps = epoch_batches(data.train, args.seed, args.batch_size, args.epochs)
    parts = {"val": data.val, "test": data.test}
    if args.learn_clips:  # the engine's learned clips, as compress --act-clip learned trains them
        trained = fine_tune(tuned, plan, sites, batches, steps=steps, lr=args.lr, distill=True, teacher=teacher,
                            batchnorm=args.batchnorm, threads=args.threads, learn_clips=args.clip_lr_scale,
                            seed=derive_seed(args.seed, 10_000, "fine-tune"), progress=False)
        learned = plan.with_clips(trained.clips)
        scores = score_line(trained.apply_to(tuned), parts, float_classes(teacher, parts, args.threads),
                            args.threads, plan=learned, sites=sites)
        ratio = [learned.clips[t].value / plan.clips[t].value for t in trained.clips]
        print(f"{args.stem}: learned clips (scale {args.clip_lr_scale:g}), +{args.epochs:g} epochs at lr {args.lr:g}, "
              f"batch-norm {args.batchnorm}: {scores}; learned clip / initial clip, mean over sites "
              f"{np.mean(ratio):.3f} (min {min(ratio):.3f}, max {max(ratio):.3f}); "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        return
    proto = simulate(tuned, plan, sites)
    names, scales = ([], {})
    if args.learn_steps:
        names, scales = learnable_steps(proto, sites, plan, args.step_lr_scale, args.lsq_clamp)
    original = training._trainable_names

    def with_steps(p, s):  # the learned steps the training graph still holds, beside the weights
        held = {t.name for t in p.graph.initializer}
        return original(p, s) + [n for n in names if n in held]

    training._trainable_names = with_steps
    trained = fine_tune(proto, None, sites, batches, steps=steps, lr=args.lr, distill=True, teacher=teacher,
                        batchnorm=args.batchnorm, threads=args.threads,
                        seed=derive_seed(args.seed, 10_000, "fine-tune"), progress=False)
    scores = score_line(trained.apply_to(proto), parts, float_classes(teacher, parts, args.threads), args.threads)
    change = [float(np.mean(trained.values[p] * k / s)) for p, k, s in scales.values()]
    moved = f"; learned step / initial step, mean over layers {np.mean(change):.3f} (min {min(change):.3f}, " \
            f"max {max(change):.3f})" if change else ""
    kind = f"learned steps (scale {args.step_lr_scale:g}{', LSQ clamp' if args.lsq_clamp else ''})" if scales \
        else "fixed steps"
    print(f"{args.stem}: {kind}, +{args.epochs:g} epochs at lr {args.lr:g}, "
          f"batch-norm {args.batchnorm}: {scores}{moved}; {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()

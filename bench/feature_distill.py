"""``bench/polish.py`` with feature distillation: the student also matches the float model's inner activations
(issue 23 screen).

Every option of ``bench/polish.py`` plus:

- ``--features A,B,...``: tensor names of the float model (default: ResNet-20's three stage outputs); the student's
  value of each is pulled toward the teacher's on the same image;
- ``--feature-weight BETA`` (default 1): the loss becomes ``T² CE(softmax(t/T), softmax(s/T))`` (the refit's
  distillation) ``+ BETA * Σ_i mean((f_i - g_i)²) / c_i``, ``f_i`` the student's tensor, ``g_i`` the teacher's, and
  ``c_i`` the teacher's mean square of that tensor over the first 512 training images (unaugmented), so that each
  term is a relative squared error (FitNets' hint loss, one per stage, without a regressor: student and teacher
  are the same network).

How, without touching the engine: the simulated model's logits output is replaced by one ``[N, classes + F]``
tensor (the logits, then each feature flattened), the teacher's target is the same concatenation from a session
on the float model with those tensors as outputs, and the loss block slices both. The three are replaced for this
process (``impq_onnx.engine.training``'s ``simulate`` and ``_distillation_loss``, both modules'
``training_target``); evaluation is untouched. Not product code: the screen's results are in
``bench/results/candidates.md`` ("Feature distillation"). The 1.74-bit seed-0 screen, 2 epochs from float:

    cp models/resnet20-cifar10/swa/model.onnx /tmp/qat/fd.float.onnx
    cp bench/runs/resnet20-swa/swa-kernel-174-rms-ep1.plan.yaml /tmp/qat/fd.plan.yaml
    .venv/bin/python bench/feature_distill.py /tmp/qat/fd --model models/resnet20-cifar10/swa/model.onnx \\
        --data /tmp/cifar10 --seed 0 --epochs 2 --lr 0.01 --batchnorm train --threads 1 --feature-weight 0.1

``--check 8`` checks the plumbing instead: at weight 0 the replaced model, target and loss must compute the plain
refit's losses, bit for bit (8 steps on 2026-12-07: equal to the last bit).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

import impq_onnx.engine.replicas as replicas
import impq_onnx.engine.training as training

sys.path.insert(0, str(Path(__file__).resolve().parent))
import polish  # noqa: E402

RESNET20_STAGES = ("layer1.2.relu2.out", "layer2.2.relu2.out", "layer3.2.relu2.out")
PREFIX = "featdistill"


class FeatureTeacher:
    """The float model with ``features`` as outputs beside its logits; ``target(x)`` is their concatenation."""

    def __init__(self, model_path: str, features: list[str], threads: int = 1):
        import onnxruntime as ort

        proto = onnx.load(model_path)
        self.logits = proto.graph.output[0].name
        known = {o for n in proto.graph.node for o in n.output}
        missing = [f for f in features if f not in known]
        if missing:
            raise SystemExit(f"{model_path}: no tensor named {', '.join(missing)}; give --features from its graph")
        proto.graph.output.extend(helper.make_tensor_value_info(f, onnx.TensorProto.FLOAT, None) for f in features)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.names = [self.logits, *features]

    def parts(self, x: np.ndarray) -> list[np.ndarray]:
        out = self.session.run(self.names, {self.input_name: x})
        return [np.asarray(o, np.float32).reshape(len(x), -1) for o in out]

    def target(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate(self.parts(x), axis=1)


def with_feature_outputs(simulate, logits: str, features: list[str], width: int):
    """``simulate`` whose model outputs ``logits`` as the concatenation [logits, flattened features...]."""

    def wrapped(*args, **kwargs) -> onnx.ModelProto:
        proto = simulate(*args, **kwargs)
        graph = proto.graph
        inner = f"{PREFIX}/logits"
        for node in graph.node:
            node.output[:] = [inner if o == logits else o for o in node.output]
            node.input[:] = [inner if i == logits else i for i in node.input]
        flat = []
        for i, name in enumerate(features):
            flat.append(f"{PREFIX}/flat{i}")
            graph.node.append(helper.make_node("Flatten", [name], [flat[-1]], name=f"{PREFIX}/flatten{i}", axis=1))
        graph.node.append(helper.make_node("Concat", [inner, *flat], [logits], name=f"{PREFIX}/concat", axis=1))
        output = next(o for o in graph.output if o.name == logits)
        dims = list(output.type.tensor_type.shape.dim)  # the batch dimension is kept as declared
        output.CopyFrom(helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, ["N", width]))
        if dims:
            output.type.tensor_type.shape.dim[0].CopyFrom(dims[0])
        return proto

    return wrapped


def feature_loss(classes: int, sizes: list[int], scales: list[float], beta: float):
    """``_distillation_loss``'s replacement: the soft cross-entropy on the first ``classes`` columns plus
    ``beta`` times each feature block's mean squared difference over its scale."""

    def make(onnxblock, temperature: float):
        class FeatureDistillation(onnxblock.Block):
            def build(self, logits: str, teacher: str = "teacher_logits") -> str:
                graph = self.base.graph
                training.add_target_input(graph, logits, teacher)

                def const(name: str, array) -> str:
                    graph.initializer.append(numpy_helper.from_array(np.asarray(array), f"{PREFIX}/{name}"))
                    return f"{PREFIX}/{name}"

                nodes = []

                def op(kind: str, inputs: list[str], out: str, **attrs) -> str:
                    nodes.append(helper.make_node(kind, inputs, [f"{PREFIX}/{out}"], name=f"{PREFIX}/{out}", **attrs))
                    return f"{PREFIX}/{out}"

                axis1 = const("axis1", np.array([1], np.int64))

                def columns(x: str, start: int, stop: int, tag: str) -> str:
                    return op("Slice", [x, const(f"start_{tag}", np.array([start], np.int64)),
                                        const(f"stop_{tag}", np.array([stop], np.int64)), axis1], f"slice_{tag}")

                s = columns(logits, 0, classes, "s_logits")
                t = columns(teacher, 0, classes, "t_logits")
                temp = const("T", np.array(temperature, np.float32))
                logp = op("LogSoftmax", [op("Div", [s, temp], "s_div")], "logp", axis=-1)
                p = op("Softmax", [op("Div", [t, temp], "t_div")], "p", axis=-1)
                summed = op("ReduceSum", [op("Mul", [p, logp], "plogp"), const("axes", np.array([-1], np.int64))],
                            "sum", keepdims=0)
                loss = op("Mul", [op("ReduceMean", [summed], "mean", keepdims=0),
                                  const("negT2", np.array(-temperature * temperature, np.float32))], "kd")
                start = classes
                for i, (size, scale) in enumerate(zip(sizes, scales)):
                    diff = op("Sub", [columns(logits, start, start + size, f"s{i}"),
                                      columns(teacher, start, start + size, f"t{i}")], f"diff{i}")
                    mse = op("ReduceMean", [op("Mul", [diff, diff], f"sq{i}")], f"mse{i}", keepdims=0)
                    term = op("Mul", [mse, const(f"w{i}", np.array(beta / scale, np.float32))], f"term{i}")
                    loss = op("Add", [loss, term], f"loss{i}")
                    start += size
                graph.node.extend(nodes)
                return loss

        return FeatureDistillation()

    return make


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)  # this script's options; the rest are polish.py's
    parser.add_argument("--features", default=",".join(RESNET20_STAGES))
    parser.add_argument("--feature-weight", type=float, default=1.0, metavar="BETA")
    parser.add_argument("--check", type=int, default=0, metavar="STEPS",
                        help="only check the plumbing: STEPS steps of the plain refit and of this script's loss at "
                             "weight 0 (the same computation), their losses printed and compared")
    args, rest = parser.parse_known_args()
    model_parser = argparse.ArgumentParser(add_help=False)
    model_parser.add_argument("stem")
    model_parser.add_argument("--model", required=True)
    model_parser.add_argument("--data", required=True)
    model_parser.add_argument("--seed", type=int, default=0)
    model_parser.add_argument("--val-fraction", type=float, default=0.1)
    model_parser.add_argument("--cache", default=None)
    shared, _ = model_parser.parse_known_args(rest)
    features = [f for f in args.features.split(",") if f]

    import impq_onnx
    from impq_onnx.data.model_data import open_model_data

    teacher = FeatureTeacher(shared.model, features)
    data = open_model_data(impq_onnx.load(shared.model), shared.data, None, val_fraction=shared.val_fraction,
                           seed=shared.seed, cache_dir=shared.cache)
    x = np.concatenate([xb for xb, _ in data.train.batches(128, shuffle=False, augment=False)][:4])
    parts = teacher.parts(x)
    classes, sizes = parts[0].shape[1], [p.shape[1] for p in parts[1:]]
    scales = [float(np.mean(np.square(p.astype(np.float64)))) for p in parts[1:]]
    print(f"feature distillation: weight {0 if args.check else args.feature_weight:g}, "
          + ", ".join(f"{f} ({n} values, mean square {c:.4g})" for f, n, c in zip(features, sizes, scales)), flush=True)

    def target(session, input_name: str, xs: np.ndarray, y, label_mix: float, temperature: float):
        if session is None:
            return y
        if label_mix > 0:
            raise SystemExit("feature distillation: --label-mix is not supported")
        return teacher.target(xs)

    def patch(weight: float) -> None:
        replicas.training_target = training.training_target = target
        training.simulate = with_feature_outputs(training.simulate, teacher.logits, features, classes + sum(sizes))
        training._distillation_loss = feature_loss(classes, sizes, scales, weight)

    if args.check:
        losses = check_losses(shared, data)
        plain = losses(args.check)
        patch(0.0)
        zero = losses(args.check)
        print(f"plain refit losses {np.round(plain, 6).tolist()}\nweight 0 losses    {np.round(zero, 6).tolist()}\n"
              f"largest difference {float(np.abs(plain - zero).max()):.3g}", flush=True)
        raise SystemExit(0 if np.array_equal(plain, zero) else 1)
    patch(args.feature_weight)
    sys.argv[1:] = rest
    polish.main()


def check_losses(shared, data):
    """``losses(steps)``: the first ``steps`` losses of polish.py's fine-tune (the stem's plan on the --model's weights,
    lr 0.01, batch-norm train, one thread), with whatever training functions are in place when it is called."""
    import impq_onnx
    from impq_onnx.data.dataset import derive_seed
    from impq_onnx.engine import fine_tune
    from impq_onnx.frontend.site_analysis import find_sites
    from impq_onnx.quant.plan import PrecisionPlan

    model = impq_onnx.load(shared.model)
    plan = PrecisionPlan.load(f"{shared.stem}.plan.yaml")
    sites = find_sites(model, (1, *data.preprocess.sample_shape))

    def losses(steps: int) -> np.ndarray:
        batches, total = polish.epoch_batches(data.train, shared.seed, 128, 1)
        trained = fine_tune(model, plan, sites, batches, steps=total, stop_step=steps, lr=0.01, distill=True,
                            teacher=model, batchnorm="train", threads=1, progress=False,
                            seed=derive_seed(shared.seed, 10_000, "fine-tune"))
        return np.array(trained.losses)

    return losses

if __name__ == "__main__":
    main()

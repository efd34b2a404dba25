"""Quantization-aware fine-tuning on onnxruntime-training (the only module that drives its training API).

:func:`fine_tune` simulates the plan (:mod:`impq_onnx.quant.simulate`), builds training artifacts for the
fake-quant graph in a temporary directory, trains the float shadow weights, biases and batch-norm
scale/shift, and returns :class:`TrainedWeights`, which :meth:`TrainedWeights.apply_to` writes back
into the float model (batch-norm running statistics included).

What onnxruntime-training 1.19 does and does not do, and what this module does about it:
- Batch-norm trains in training mode (batch statistics) whatever the export says: onnxruntime's
  training graph rewrites every BatchNormalization into BatchNormInternal. Its running mean/var are
  updated in place when they are checkpoint-state parameters (checked), so they are registered as
  frozen parameters here (as plain initializers they would be graph constants); the nodes are also set to ``training_mode=1`` with the running statistics as
  graph outputs, which are copied into the state after every step (the same values; a safeguard
  that does not rely on the in-place update). Semantics are ONNX's: ``running = m*running +
  (1-m)*batch`` with ``m = 0.9`` and the biased (population) batch variance (torch uses the unbiased
  one for ``running_var``).
- Its SGD (``SGDOptimizerV2``) has neither momentum nor weight decay, so SGD runs in numpy on the
  gradients onnxruntime computed (torch's SGD semantics: ``g += wd*w; v = mu*v + g; w -= lr*v``).
  AdamW is onnxruntime's own (decoupled weight decay).
- Replicas (``replicas=R > 1``): data-parallel training inside one process on R InferenceSessions of
  the gradient graph, SGD only; see :mod:`impq_onnx.engine.replicas`.
- Unlabelled data: the loss is the soft cross-entropy to the float model's logits (distillation),
  ``T^2 * mean_batch(-sum_c softmax(t/T) log_softmax(s/T))``, built as an onnxblock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import helper

from impq_onnx.engine.batches import epochs, fixed_batch, fixed_chunks, split
from impq_onnx.engine import ort_training as _ort_training
from impq_onnx.engine.differentiable import check_differentiable, concrete_image_size, make_differentiable
from impq_onnx.errors import ConfigError, DataError, ModelError
from impq_onnx.events import Event, Progress, progress_callback
from impq_onnx.frontend.ops import LAYER_OPS
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.simulate import SIMULATION_PREFIX, as_proto, learned_clips, learned_step_name, simulate
from impq_onnx.frontend.sites import SiteTable
from impq_onnx.engine.replicas import Replicas, sgd_update, training_target
from impq_onnx.engine.batchnorm_graph import BATCHNORM_MODES, batchnorm_frozen, batchnorm_to_training, own_batchnorms
from impq_onnx.engine.schedule import SCHEDULES, learning_rate
from impq_onnx.runtime import default_replicas, lap, resolve_threads

__all__ = ["BATCHNORM_MODES", "FineTuneDiverged", "TrainedWeights", "fine_tune", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adamw")


@dataclasses.dataclass
class TrainedWeights:
    """The float parameters after fine-tuning, keyed by initializer name."""

    values: dict[str, np.ndarray]
    losses: list[float]
    steps: int
    images: int
    seconds: float
    step_seconds: list[float] = dataclasses.field(default_factory=list)  # wall time of each step
    clips: dict[str, float] = dataclasses.field(default_factory=dict)  # learned activation clips (learn_clips)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def apply_to(self, model):
        """A copy of ``model`` (ModelProto, onnx_ir.Model or CanonicalModel) with these values."""
        proto = as_proto(model)
        found = set()
        for tensor in proto.graph.initializer:
            if tensor.name in self.values:
                tensor.CopyFrom(onnx.numpy_helper.from_array(self.values[tensor.name].astype(np.float32), tensor.name))
                found.add(tensor.name)
        missing = sorted(set(self.values) - found)
        if missing:
            raise ModelError(f"the model has no initializer '{missing[0]}' to receive the fine-tuned value")
        if isinstance(model, onnx.ModelProto):
            return proto
        import onnx_ir as ir

        new_ir = ir.serde.deserialize_model(proto)
        if isinstance(model, ir.Model):
            return new_ir
        return dataclasses.replace(model, model=new_ir)


class FineTuneDiverged(DataError):
    """The training loss became non-finite (NaN or inf): the learning rate is too high for this model.

    ``step`` is the 0-based step it happened at, ``losses`` the finite losses before it, ``seconds`` the time
    spent. A DataError (exit 2) for a direct caller; the search loop catches it and retries at a lower rate."""

    def __init__(self, loss: float, step: int, losses: list[float], seconds: float) -> None:
        super().__init__(f"the training loss became {loss} at step {step}; lower the learning rate")
        self.step, self.losses, self.seconds = step, list(losses), seconds


def _session_options(threads: int, deterministic: bool = True, profile: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.use_deterministic_compute = deterministic
    options.log_severity_level = 3
    return options


def _relu_as_clip(proto: onnx.ModelProto) -> int:
    """Relu -> Clip(x, 0): same forward values, and onnxruntime 1.19's ReluGrad is ~3x slower than
    Clip's gradient (a quarter of ResNet-20's training step). Returns the number of rewrites."""
    zero = f"{SIMULATION_PREFIX}/engine/zero"
    count = 0
    for node in proto.graph.node:
        if node.op_type == "Relu" and node.domain in ("", "ai.onnx"):
            node.op_type = "Clip"
            node.input.append(zero)
            count += 1
    if count:
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.0, np.float32), zero))
    return count


def _trainable_names(proto: onnx.ModelProto, sites: SiteTable) -> list[str]:
    inits = {t.name: t for t in proto.graph.initializer}
    names: list[str] = []
    for layer in sites.layers:
        names += [n for n in (layer.weight, layer.bias) if n]
    for node in own_batchnorms(proto):
        names += list(node.input[1:3])
    seen, result = set(), []
    for n in names:
        if n in inits and n not in seen and inits[n].data_type == onnx.TensorProto.FLOAT:
            seen.add(n)
            result.append(n)
    return result


# Ops whose onnxruntime-training gradient always writes ``<input>_grad`` for every float input, needed or not.
_GRADIENT_FOR_EVERY_INPUT = ("LayerNormalization", "SimplifiedLayerNormalization")


def _kept_apart(proto: onnx.ModelProto, trainable: list[str]) -> set[str]:
    """Constant inputs of the ops in :data:`_GRADIENT_FOR_EVERY_INPUT` that are not trained.

    onnxruntime's ConstantSharing merges equal small initializers before the gradient is built (e.g. the
    all-ones scales of freshly initialised LayerNorms of one width); two LayerNormalizationGrad nodes then
    both define ``<scale>_grad`` and the builder fails ("Duplicate definition of name"). Frozen parameters
    are graph inputs, which are never merged; their values stay as they are."""
    inits = {t.name: t for t in proto.graph.initializer}
    kept = set()
    for node in proto.graph.node:
        if node.op_type in _GRADIENT_FOR_EVERY_INPUT:
            kept.update(name for name in node.input[1:] if name in inits and name not in trainable
                        and inits[name].data_type == onnx.TensorProto.FLOAT)
    return kept


def add_target_input(graph: onnx.GraphProto, logits: str, teacher: str) -> None:
    """Declare the loss's target input ``teacher`` with the shape and type of the graph's output ``logits``."""
    source = next(o for o in graph.output if o.name == logits)
    value = onnx.ValueInfoProto()
    value.CopyFrom(source)
    value.name = teacher
    graph.input.append(value)


def _distillation_loss(onnxblock, temperature: float):
    class SoftCrossEntropy(onnxblock.Block):
        def build(self, logits: str, teacher: str = "teacher_logits") -> str:
            graph = self.base.graph
            add_target_input(graph, logits, teacher)
            t = onnx.numpy_helper.from_array(np.array(temperature, np.float32), "distill/T")
            t2 = onnx.numpy_helper.from_array(np.array(-temperature * temperature, np.float32), "distill/negT2")
            axes = onnx.numpy_helper.from_array(np.array([-1], np.int64), "distill/axes")
            graph.initializer.extend([t, t2, axes])
            nodes = [
                helper.make_node("Div", [logits, t.name], ["distill/s"], name="distill/div_s"),
                helper.make_node("Div", [teacher, t.name], ["distill/t"], name="distill/div_t"),
                helper.make_node("LogSoftmax", ["distill/s"], ["distill/logp"], name="distill/logsoftmax", axis=-1),
                helper.make_node("Softmax", ["distill/t"], ["distill/p"], name="distill/softmax", axis=-1),
                helper.make_node("Mul", ["distill/p", "distill/logp"], ["distill/plogp"], name="distill/mul"),
                helper.make_node("ReduceSum", ["distill/plogp", axes.name], ["distill/sum"], name="distill/sum",
                                 keepdims=0),
                helper.make_node("ReduceMean", ["distill/sum"], ["distill/mean"], name="distill/mean", keepdims=0),
                helper.make_node("Mul", ["distill/mean", t2.name], ["distill/loss"], name="distill/loss"),
            ]
            graph.node.extend(nodes)
            return "distill/loss"

    return SoftCrossEntropy()


def _make_gradients_runnable(path: str) -> int:
    """Let each layer op replace gradient nodes the CPU build cannot run (ConvTransposeGrad); the file is
    rewritten only when something changed."""
    training_model = onnx.load(path)
    changed = sum(op.make_gradients_runnable(training_model, {}) for op in LAYER_OPS.values())
    if changed:
        onnx.save(training_model, path)
    return changed


def fine_tune(
    model,
    plan: PrecisionPlan | None,
    sites: SiteTable,
    batches: Callable[[], Iterable] | Iterable,
    *,
    steps: int,
    lr: float,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    warmup_steps: int | None = None,
    final_lr: float = 0.0,
    lr_schedule: str = "cosine",
    distill: bool | None = None,
    teacher=None,
    temperature: float = 1.0,
    label_mix: float = 0.0,
    batchnorm_momentum: float | None = None,
    batchnorm: str = "train",
    threads: int | None = None,
    seed: int = 0,
    progress: bool | Progress = True,
    profile: str | None = None,
    replicas: int | None = None,
    start_step: int = 0,
    stop_step: int | None = None,
    velocity: dict[str, np.ndarray] | None = None,
    learn_clips: float = 0.0,
) -> TrainedWeights:
    """Fine-tune ``model`` (float; CanonicalModel or ModelProto) under ``plan`` (None: float training).

    ``batches`` yields ``(x, y)`` numpy batches (``y`` None or absent: unlabelled); a callable is called
    once per epoch. ``distill`` (default: when the first batch has no labels) trains against the
    logits of ``teacher`` (default: the float ``model`` itself); ``label_mix`` a (labelled data only) makes
    the target (1 - a) the teacher's distribution + a the one-hot label, i.e. the loss (1 - a) distillation + a
    label cross-entropy (:func:`~impq_onnx.engine.replicas.distillation_target`). The learning rate warms up
    linearly for ``warmup_steps`` (default 5% of ``steps``) then follows ``lr_schedule`` to ``final_lr``: a
    cosine, or ``exponential`` (a constant factor per step; ``final_lr`` must then be positive).
    ``batchnorm_momentum`` is ONNX's (weight of the old running value; None keeps the model's, 0.9).
    ``batchnorm``: ``"train"`` normalises with batch statistics and updates the running ones;
    ``"frozen"`` keeps the running statistics fixed and normalises with them (inference arithmetic,
    :func:`~impq_onnx.engine.batchnorm_graph.batchnorm_frozen`), training only the scale and shift.
    ``profile`` (a path prefix) writes onnxruntime's JSON profile of the training session there
    (with replicas, one per replica: ``{profile}-replica{i}``).
    ``replicas`` > 1 splits every batch into that many parts trained concurrently, each on
    ``max(1, threads // replicas)`` threads, and averages their gradients (weighted by part size) into
    one SGD step; batch-norm then uses per-part batch statistics (see the module docstring). SGD only.
    ``threads`` None: every available core; ``replicas`` None: the fastest count for them and the first
    batch's size (:func:`impq_onnx.runtime.default_replicas`). Replicas change the numbers (batch-norm
    statistics, summation order), so a caller that records its configuration resolves them itself.
    ``start_step`` / ``stop_step`` (default 0 / ``steps``) run only that part of the ``steps``-step schedule,
    and ``velocity`` (SGD only) is the momentum, read and updated in place: consecutive parts, each on the
    previous part's weights and velocity with ``batches`` continuing where it stopped, compute what one call
    does, so a long fine-tune can be checkpointed between them (:mod:`impq_onnx.search.refit`).
    ``learn_clips`` > 0 trains each quantized activation site's step with the weights (LSQ's form of a learned
    clip, its gradient scale that many times LSQ's; ``simulate(..., learn_clips=...)``): the result's ``clips``
    holds the learned clip values (:func:`impq_onnx.quant.simulate.learned_clips`), for the plan of a next
    part or of the output; its ``values`` hold only the model's parameters (``velocity`` also the steps').
    """
    import onnxruntime as ort

    if batchnorm not in BATCHNORM_MODES:
        raise ConfigError(f"batchnorm {batchnorm!r} is unknown; use one of {', '.join(BATCHNORM_MODES)}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer {optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, not {steps}")
    stop_step = steps if stop_step is None else stop_step
    if not 0 <= start_step < stop_step <= steps:
        raise ConfigError(f"a fine-tune part runs steps {start_step} to {stop_step} of 0 to {steps}: give "
                          "0 <= start_step < stop_step <= steps")
    if (start_step or stop_step < steps or velocity) and optimizer != "sgd":
        raise ConfigError(f"a fine-tune in parts (start_step, stop_step, velocity) needs optimizer 'sgd': "
                          f"{optimizer}'s state stays inside onnxruntime")
    if lr_schedule not in SCHEDULES:
        raise ConfigError(f"learning-rate schedule {lr_schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
    if lr_schedule == "exponential" and not (lr > 0 and final_lr > 0):
        raise ConfigError(f"an exponential learning-rate schedule needs lr and final_lr above 0 (got {lr}, {final_lr})")
    if replicas is not None and (isinstance(replicas, bool) or not isinstance(replicas, (int, np.integer))
                                 or replicas < 1):
        raise ConfigError(f"replicas must be a whole number of at least 1, not {replicas!r}")
    if replicas is not None and replicas > 1 and optimizer != "sgd":
        raise ConfigError(f"replicas > 1 needs optimizer 'sgd' (onnxruntime's {optimizer} steps one training module); "
                          f"use replicas=1 with {optimizer}")
    threads = resolve_threads(threads)
    artifacts, api, onnxblock = _ort_training.load()
    ort.capi._pybind_state.set_seed(seed)
    report = progress_callback(progress)

    stream = epochs(batches)
    first = next(stream)
    x0, y0 = split(first)
    lap("data")
    replicas = default_replicas(threads, len(x0), optimizer) if replicas is None else int(replicas)
    fixed = fixed_batch(as_proto(model))
    if fixed is not None and fixed != len(x0):
        replicas = 1  # each step accumulates the gradients of the batch's chunks of the fixed size
    replica_threads = threads if replicas == 1 else max(1, threads // replicas)
    distill = (y0 is None) if distill is None else distill
    if not distill and y0 is None:
        raise DataError("the training data has no labels; fine-tune with distill=True")
    if not 0.0 <= label_mix <= 1.0:
        raise ConfigError(f"label_mix must be in [0, 1], not {label_mix}")
    if label_mix > 0 and (not distill or y0 is None):
        raise ConfigError("label_mix mixes labels into distillation: it needs distill=True and labelled data")

    proto = simulate(model, plan, sites, learn_clips=learn_clips) if plan is not None else as_proto(model)
    steps_learned = [learned_step_name(s.tensor) for s in sites.activations
                     if learn_clips > 0 and plan is not None and plan.activations.get(s.tensor) is not None]
    concrete_image_size(proto, x0.shape)
    running: dict[str, str] = {}
    if batchnorm == "frozen":  # scale and shift found while the BatchNormalization nodes are still there
        frozen_trainable = _trainable_names(proto, sites) + steps_learned
        batchnorm_frozen(proto)
    else:
        running = batchnorm_to_training(proto, batchnorm_momentum)
    _relu_as_clip(proto)
    make_differentiable(proto)
    check_differentiable(proto, getattr(model, "label", "the model"))
    trainable = frozen_trainable if batchnorm == "frozen" else _trainable_names(proto, sites) + steps_learned
    frozen = sorted(set(running.values()) | _kept_apart(proto, trainable))
    logits = sites.logits
    _declare_logits_shape(proto, logits, model, x0, replica_threads)
    dims = {t.name: list(t.dims) for t in proto.graph.initializer}
    proto.graph.output.extend(
        helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, dims[stat]) for n, stat in running.items()
    )
    teacher_session = None
    if distill:
        loss_block = _distillation_loss(onnxblock, temperature)
        teacher_proto = as_proto(teacher if teacher is not None else model)
        teacher_session = ort.InferenceSession(teacher_proto.SerializeToString(), _session_options(replica_threads),
                                               providers=["CPUExecutionProvider"])
    else:
        loss_block = artifacts.LossType.CrossEntropyLoss
    lap("graph build")
    # SGD runs in numpy (see the module docstring): no optimizer graph for it.
    optim_block = onnxblock.optim.AdamW(weight_decay=weight_decay) if optimizer == "adamw" else None

    with tempfile.TemporaryDirectory(prefix="impq-train-") as tmp:
        with _native_stderr_silenced():
            artifacts.generate_artifacts(
                proto, requires_grad=trainable, frozen_params=frozen, loss=loss_block, optimizer=optim_block,
                artifact_directory=tmp, loss_input_names=[logits], additional_output_names=list(running),
            )
        _make_gradients_runnable(os.path.join(tmp, "training_model.onnx"))
        lap("training artifacts")
        state = api.CheckpointState.load_checkpoint(os.path.join(tmp, "checkpoint"))
        module = opt = group = None
        if replicas == 1:
            module = api.Module(os.path.join(tmp, "training_model.onnx"), state, None,
                                session_options=_session_options(threads, profile=profile))
            opt = api.Optimizer(os.path.join(tmp, "optimizer_model.onnx"), module) if optimizer == "adamw" else None
            module.train()
        else:
            options = [_session_options(replica_threads, profile=f"{profile}-replica{i}" if profile else None)
                       for i in range(replicas)]
            group = Replicas(os.path.join(tmp, "training_model.onnx"), state, trainable, running, options,
                             teacher_session, sites.input_name, profiled=profile is not None,
                             label_mix=label_mix, temperature=temperature)
        lap("session creation")
        velocity = {} if velocity is None else velocity
        warmup = max(0, round(0.05 * steps)) if warmup_steps is None else warmup_steps
        losses: list[float] = []
        images, start = 0, time.perf_counter()
        if report:
            report(Event("phase_start", "fine-tune", "", start_step, steps))
        line = ""
        stat_names = list(running)
        batch = (x0, y0)
        step_seconds: list[float] = []
        for step in range(start_step, stop_step):
            tick = time.perf_counter()
            if step > start_step:
                batch = split(next(stream))
            x, y = batch
            rate = learning_rate(lr_schedule, step, steps, lr, warmup, final_lr)
            if group is not None:
                loss = group.forward_backward(x, y)
                if not np.isfinite(loss):
                    stream.close()  # stops the prefetch thread now, not when the traceback is let go
                    raise FineTuneDiverged(loss, step, losses, time.perf_counter() - start)
                group.sgd_step(velocity, rate, momentum, weight_decay)
            else:
                parts = fixed_chunks(len(x), fixed)
                chunk_losses = []
                for part in parts:  # onnxruntime adds up the gradients of the parts until lazy_reset_grad
                    xs = x[part]
                    target = training_target(teacher_session, sites.input_name, xs, None if y is None else y[part],
                                             label_mix, temperature)
                    outputs = module(xs, target)
                    outputs = outputs if isinstance(outputs, (tuple, list)) else [outputs]
                    chunk_losses.append(float(np.asarray(outputs[0])))
                    for name, value in zip(stat_names, outputs[1:]):
                        state.parameters[running[name]].data = np.asarray(value, np.float32)
                loss = float(np.mean(chunk_losses))
                if not np.isfinite(loss):
                    stream.close()  # stops the prefetch thread now, not when the traceback is let go
                    raise FineTuneDiverged(loss, step, losses, time.perf_counter() - start)
                if opt is not None:
                    opt.set_learning_rate(rate)
                    opt.step()
                else:
                    _sgd_step(state, trainable, velocity, rate, momentum, weight_decay, 1.0 / len(parts))
                module.lazy_reset_grad()
            losses.append(loss)
            images += len(x)
            step_seconds.append(time.perf_counter() - tick)
            now = time.perf_counter() - start
            if report:
                mean_loss, speed = float(np.mean(losses[-20:])), images / max(now, 1e-9)
                line = f"fine-tune step {step + 1}/{steps} loss {mean_loss:.4f} lr {rate:.3g} {speed:.0f} img/s"
                report(Event("step", "fine-tune", line, step + 1, steps,
                             {"loss": mean_loss, "lr": rate, "images_per_second": speed}))
        seconds = time.perf_counter() - start
        if report:
            report(Event("phase_end", "fine-tune", line, stop_step, steps,  # the last step's line
                         {"loss": float(np.mean(losses[-20:])), "seconds": seconds}))
        lap("fine-tune steps")
        stream.close()  # stops the prefetch thread
        if group is not None:
            values = {name: np.array(group.params[name]) for name in trainable + frozen}
            group.close()
        else:
            values = {name: np.array(state.parameters[name].data) for name in trainable + frozen}
        del opt, module, group  # a profiled session writes its file when it ends
    lap("fine-tune other")
    clips = learned_clips(plan, sites, values, learn_clips) if steps_learned and plan is not None else {}
    for name in steps_learned:  # a next part starts from |p| (the clip): the mirrored momentum continues exactly
        if name in velocity and float(np.asarray(values[name]).reshape(-1)[0]) < 0:
            velocity[name] = -velocity[name]
    values = {name: value for name, value in values.items() if name not in steps_learned}
    return TrainedWeights(values, losses, stop_step - start_step, images, seconds, step_seconds, clips)


def _declare_logits_shape(proto: onnx.ModelProto, logits: str, model, x0: np.ndarray, threads: int) -> None:
    """Give the logits output a ``[batch, classes]`` shape where the graph declares none (shape inference
    stopped at an op it does not know): onnxruntime's loss blocks read the labels' shape from it (an
    IndexError otherwise). The class count comes from running the float model on the first images."""
    output = next((o for o in proto.graph.output if o.name == logits), None)
    if output is None:
        return
    tensor = output.type.tensor_type
    if tensor.HasField("shape") and len(tensor.shape.dim) >= 2 and tensor.shape.dim[-1].HasField("dim_value"):
        return
    from impq_onnx.runtime import inference_session

    base = as_proto(model)
    session = inference_session(base.SerializeToString(), threads)
    fixed = fixed_batch(base)
    classes = session.run([logits], {session.get_inputs()[0].name: x0[: fixed or 1]})[0].shape[-1]
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    new = helper.make_tensor_value_info(logits, tensor.elem_type or onnx.TensorProto.FLOAT, [
        batch.dim_value if batch.HasField("dim_value") else (batch.dim_param or "N"), int(classes)])
    output.CopyFrom(new)


def _sgd_step(state, names: list[str], velocity: dict[str, np.ndarray], lr: float, momentum: float,
              weight_decay: float, grad_scale: float = 1.0) -> None:
    for name in names:
        param = state.parameters[name]
        g = param.grad
        if g is None:
            continue
        if grad_scale != 1.0:
            g = np.asarray(g) * np.float32(grad_scale)
        param.data = sgd_update(name, param.data, g, velocity, lr, momentum, weight_decay)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Artifact generation logs every graph transformer at info level on the C++ stderr (fd 2),
    whatever the logger severity once the onnxruntime environment exists; keep it off the console."""
    fd = 2  # the C++ runtime writes to the process's stderr, not to sys.stderr
    sys.stderr.flush()
    saved = os.dup(fd)
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)

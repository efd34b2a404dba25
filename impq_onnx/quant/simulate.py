"""Plan + canonical model -> fake-quant ONNX graph (the simulated model that training and search use).

:func:`simulate` inserts, for every layer with quantized kernels, a weight-quantizer subgraph between
the float *shadow* weight initializer (kept, so it stays trainable) and the layer, and for every
activation site with bits, an activation quantizer between the tensor and the layers that read it.
The quantizers are defined exactly in :mod:`impq_onnx.quant.quantizers`. The result is a plain
``onnx.ModelProto`` that onnxruntime runs for inference and that the engine turns into training
artifacts; it uses ``com.microsoft::FakeQuant`` (an onnxruntime contrib op).

:func:`calibrate_clips` fills the clips of activation sites that have no batch-norm before them with
the 99.9th percentile of the float model's activations over a few batches; :func:`fit_clips_mse` sets a
site's clip to the one with the least squared quantization error at its bits (``--act-clip mse``).

``simulate(..., learn_clips=S)`` builds each activation quantizer in its learned form (the fine-tune's, with
``--act-clip learned``): the step is a trainable initializer (:func:`learned_step_name`) and
:func:`learned_clips` reads the clips back from the trained values.
"""

from __future__ import annotations

import heapq
import logging
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from impq_onnx.errors import DataError, InternalError, PlanError
from impq_onnx.quant.plan import ActivationClip, PrecisionPlan
from impq_onnx.quant.quantizers import (
    GraphBuilder,
    activation_grid,
    build_activation_quantizer,
    build_learned_activation_quantizer,
    learned_step_factor,
    quantize_activation,
)
from impq_onnx.quant.schemes import weight_scheme
from impq_onnx.frontend.sites import SiteTable

__all__ = ["simulate", "calibrate_clips", "fit_clips_mse", "mse_clip", "quantized_weight_name", "as_proto",
           "SIMULATION_PREFIX", "site_values", "MSE_SAMPLES", "learned_step_name", "learned_clips"]

logger = logging.getLogger(__name__)

SIMULATION_PREFIX = "impq"
CALIBRATION_SAMPLES = 1_000_000  # values kept per site and batch for the percentile (memory bound)


def as_proto(model) -> onnx.ModelProto:
    """A private copy of ``model`` as a ModelProto (CanonicalModel, onnx_ir.Model or ModelProto)."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    if hasattr(model, "to_proto"):
        return model.to_proto()
    import onnx_ir as ir

    if isinstance(model, ir.Model):
        return ir.serde.serialize_model(model)
    raise TypeError(f"expected a CanonicalModel, onnx_ir.Model or onnx.ModelProto, not {type(model).__name__}")


def quantized_weight_name(layer: str) -> str:
    """Name of the tensor that carries the simulated (quantized) weight of layer node ``layer``."""
    return f"{SIMULATION_PREFIX}/{layer}/wq"


def learned_step_name(tensor: str) -> str:
    """Name of the trainable initializer ``p`` of activation site ``tensor``'s learned step ``s = k * p``."""
    return f"{SIMULATION_PREFIX}/{tensor}/learned_step"


def _learned_factor(plan: PrecisionPlan, site, scale: float) -> float:
    return learned_step_factor(site.elements, plan.activations[site.tensor], plan.clips[site.tensor].signed, scale)


def learned_clips(plan: PrecisionPlan, sites: SiteTable, values: dict[str, np.ndarray], scale: float) -> dict[str, float]:
    """The clips (``s * 2^B``, ``s * 2^(B-1)`` signed; float32 values) of the sites whose learned step
    (:func:`learned_step_name`) ``values`` holds, from a fine-tune of ``simulate(..., learn_clips=scale)`` under
    ``plan``: ``|p| * k``, the step the fine-tune computed with. A step that training drove to exactly zero or to
    a non-finite value keeps the plan's clip."""
    clips = {}
    for site in sites.activations:
        name = learned_step_name(site.tensor)
        if name not in values or plan.activations.get(site.tensor) is None:
            continue
        bits, signed = plan.activations[site.tensor], plan.clips[site.tensor].signed
        step = np.abs(np.float32(np.asarray(values[name], np.float32).reshape(-1)[0])) * np.float32(
            _learned_factor(plan, site, scale))
        if np.isfinite(step) and step > 0:
            clips[site.tensor] = float(step * np.float32(2.0 ** (bits - 1 if signed else bits)))
    return clips


def _default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 13


def simulate(model, plan: PrecisionPlan, sites: SiteTable, *, expose_weights: bool = False,
             learn_clips: float = 0.0) -> onnx.ModelProto:
    """The fake-quant graph of ``model`` under ``plan``; the float model is not modified.

    ``expose_weights`` adds each quantized weight (named :func:`quantized_weight_name`) as an extra
    graph output, after the logits. ``learn_clips`` > 0 builds the activation quantizers in their learned form
    (the same function, the step an initializer :func:`learned_step_name` to train, its gradient scale
    ``learn_clips`` times LSQ's; see :func:`impq_onnx.quant.quantizers.learned_step_factor`).
    """
    plan.validate(sites)
    proto = as_proto(model)
    graph = proto.graph
    opset = _default_opset(proto)
    nodes = {node.name: node for node in graph.node}
    builder = GraphBuilder(SIMULATION_PREFIX, opset)
    exposed = []

    for layer in sites.layers:
        bits = plan.weights[layer.node]
        if all(b is None for b in bits):
            continue
        node = nodes.get(layer.node)
        if node is None:
            raise PlanError(f"weights: layer '{layer.node}' is not a node of the model")
        g = GraphBuilder(f"{SIMULATION_PREFIX}/{layer.node}", opset)
        q = weight_scheme(plan.weight_scheme).build_quantizer(g, layer.weight, layer.weight_shape, layer.kernel_axis, bits)
        final = quantized_weight_name(layer.node)
        g.nodes.append(helper.make_node("Identity", [q], [final], name=f"{final}/Identity"))
        builder.nodes.extend(g.nodes)
        builder.initializers.extend(g.initializers)
        node.input[layer.op.weight_input] = final
        exposed.append(final)

    for site in sites.activations:
        bits = plan.activations.get(site.tensor)
        if bits is None:
            continue
        clip = plan.clips[site.tensor]
        if clip.value is None:
            raise PlanError(
                f"clips['{site.tensor}']: no clip value (no batch-norm before it); calibrate the clips first"
            )
        g = GraphBuilder(f"{SIMULATION_PREFIX}/{site.tensor}", opset)
        if learn_clips > 0:
            k = _learned_factor(plan, site, learn_clips)
            step = np.float32(activation_grid(bits, clip.value, clip.signed)[0])
            p = learned_step_name(site.tensor)
            g.initializers.append(numpy_helper.from_array(np.asarray([step / np.float32(k)], np.float32), p))
            q = build_learned_activation_quantizer(g, site.tensor, bits, clip.signed, p, k)
        else:
            q = build_activation_quantizer(g, site.tensor, bits, clip.value, clip.signed)
        builder.nodes.extend(g.nodes)
        builder.initializers.extend(g.initializers)
        for name in site.layers:
            node, index = nodes[name], sites.layer(name).op.activation_input
            if node.input[index] == site.tensor:
                node.input[index] = q

    # Quantizer nodes go first (they only read initializers and existing tensors); then restore a
    # topological order, since activation quantizers read tensors produced inside the graph.
    ordered = _topological(builder.nodes + list(graph.node))
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(builder.initializers)
    if expose_weights:
        for name in exposed:
            graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    if not any(entry.domain == "com.microsoft" for entry in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return proto


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Stable topological order (Kahn): a node keeps its relative place unless an input forces it later."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        for name in set(node.input):
            p = producer.get(name)
            if p is not None and p != i:
                waiting[i] += 1
                users[p].append(i)
    ready = [i for i in range(len(nodes)) if waiting[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise InternalError("the simulated graph has a cycle (impq_onnx.quant.simulate)")
    return order


def site_values(model, names: list[str], batches: Iterable, *, max_batches: int, keep: int,
                threads: int | None, seed: int) -> tuple[dict[str, np.ndarray], int]:
    """The values of tensors ``names`` of ``model`` over the first ``max_batches`` of ``batches`` (at most
    ``keep`` per tensor and batch, a fixed-seed random subset), and the number of batches read."""
    from impq_onnx.runtime import inference_session

    proto = as_proto(model)
    present = {o.name for o in proto.graph.output}
    for name in names:
        if name not in present:
            proto.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = inference_session(proto.SerializeToString(), threads)
    input_name = session.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    values: dict[str, list[np.ndarray]] = {n: [] for n in names}
    seen = 0
    for batch in batches:
        if seen >= max_batches:
            break
        x = np.asarray(batch[0] if isinstance(batch, (tuple, list)) else batch, np.float32)
        fixed = session.get_inputs()[0].shape[0]  # a batch the graph bakes in: run in chunks of it
        step = fixed if isinstance(fixed, int) and 0 < fixed < len(x) else len(x)
        outs: list[list[np.ndarray]] = [[] for _ in names]
        for start in range(0, len(x) - step + 1, step):
            for i, out in enumerate(session.run(names, {input_name: x[start : start + step]})):
                outs[i].append(np.array(out, copy=True).reshape(-1))  # outputs may alias a reused buffer
        for name, parts in zip(names, outs):
            flat = np.concatenate(parts)
            if flat.size > keep:
                flat = flat[rng.choice(flat.size, keep, replace=False)]
            values[name].append(flat)
        seen += 1
    if seen == 0:
        raise DataError("calibrating activation clips needs at least one batch of data")
    return {name: np.concatenate(parts) for name, parts in values.items()}, seen


def calibrate_clips(model, plan: PrecisionPlan, sites: SiteTable, batches: Iterable, *, percentile: float = 99.9,
                    max_batches: int = 5, only_missing: bool = True, threads: int | None = None, seed: int = 0) -> PrecisionPlan:
    """A copy of ``plan`` whose activation clips are the ``percentile`` of the float model's values.

    Unsigned sites use the values themselves, signed sites their magnitudes. With ``only_missing``
    (default) sites whose clip is already known (from a batch-norm) keep it. At most
    ``CALIBRATION_SAMPLES`` values per site and batch are kept (a fixed-seed random subset).
    ``batches`` yields ``(x, y)`` or ``x`` numpy batches; only the first ``max_batches`` are read.
    """
    todo = [s for s in sites.activations if not (only_missing and plan.clips[s.tensor].value is not None)]
    result = plan.copy()
    if not todo:
        return result
    values, seen = site_values(model, [s.tensor for s in todo], batches, max_batches=max_batches,
                               keep=CALIBRATION_SAMPLES, threads=threads, seed=seed)
    for site in todo:
        data = values[site.tensor]
        signed = result.clips[site.tensor].signed
        data = np.abs(data) if signed else np.maximum(data, 0)
        clip = float(np.percentile(data, percentile))
        if not np.isfinite(clip) or clip <= 0:
            clip = float(np.max(data)) if np.max(data) > 0 else 1.0
        result.clips[site.tensor] = ActivationClip(clip, signed)
        logger.info("clip of %s: %.4g (%sth percentile over %d batches)", site.tensor, clip, percentile, seen)
    return result


MSE_SAMPLES = 65_536  # values kept per site and batch for the least-squares clip
_COARSE = 2.0 ** (-np.arange(64) / 8.0)  # the top value down to 1/256 of it, 9 % apart
_FINE = 33


def mse_clip(values: np.ndarray, bits: int, signed: bool) -> float | None:
    """The clip whose activation quantizer at ``bits`` (:func:`impq_onnx.quant.quantizers.quantize_activation`)
    has the least mean squared error on ``values``: the largest magnitude down to 1/256 of it on a geometric
    grid, then a linear grid between the best one's neighbours. None when no value is above zero."""
    v = np.asarray(values, np.float32).reshape(-1)
    v = v[np.isfinite(v)]
    top = float(np.max(np.abs(v) if signed else v, initial=0.0))
    if not top > 0:
        return None

    def error(clip: float) -> float:
        return float(np.mean(np.square(quantize_activation(v, bits, clip, signed) - v, dtype=np.float64)))

    coarse = [float(top * f) for f in _COARSE]
    errors = [error(c) for c in coarse]
    best = int(np.argmin(errors))
    hi, lo = coarse[max(best - 1, 0)], coarse[min(best + 1, len(coarse) - 1)]
    fine = [float(c) for c in np.linspace(lo, hi, _FINE)]
    fine_errors = [error(c) for c in fine]
    i = int(np.argmin(fine_errors))
    return fine[i] if fine_errors[i] < errors[best] else coarse[best]


def fit_clips_mse(model, plan: PrecisionPlan, sites: SiteTable, tensors: Iterable[str], batches: Iterable, *,
                  max_batches: int = 5, threads: int | None = None, seed: int = 0) -> PrecisionPlan:
    """A copy of ``plan`` in which each site of ``tensors`` (that has bits) gets the :func:`mse_clip` of
    ``model``'s values there at its bits (``--act-clip mse``); a site whose values are all zero or below keeps
    its clip. At most ``MSE_SAMPLES`` values per site and batch, a fixed-seed random subset."""
    result = plan.copy()
    todo = [t for t in tensors if result.activations.get(t) is not None]
    if not todo:
        return result
    values, seen = site_values(model, todo, batches, max_batches=max_batches, keep=MSE_SAMPLES, threads=threads,
                               seed=seed)
    for tensor in todo:
        old = result.clips[tensor]
        clip = mse_clip(values[tensor], result.activations[tensor], old.signed)
        if clip is not None:
            result.clips[tensor] = ActivationClip(clip, old.signed)
            logger.info("clip of %s at %d bits: %.4g (least squared error over %d batches)", tensor,
                        result.activations[tensor], clip, seen)
    return result

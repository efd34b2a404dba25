"""Raw margin-gradient sums: the sample loops of the exact and the fast path.

Both paths return :class:`GradientSums`: per layer and kernel, and per activation site, the sum
over samples ``n`` and runner-ups ``i`` of ``sum_{x in group} |d(Z_i - Z_Yhat)/dx|^2 / |Z_i - Z_Yhat|^2``
(the paper's summand without 1/24 and without the 2^-B factor; :mod:`impq_onnx.sensitivity`
applies the weighting).

Graph preparation (:func:`tapped_model`): every activation site gets an ``Identity`` *tap* that
feeds only the quantized layers reading it, and every layer's weight input gets one too. The
gradient with respect to a tap is the gradient through the quantized layers only, which is where
quantization noise enters (a ResNet block input also feeds the shortcut, which is not quantized).
In a simulated (fake-quant) model from :func:`impq_onnx.quant.simulate.simulate` the taps sit after the
quantizers, so gradients are taken at the quantized values and flow back through the quantizers'
straight-through path.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from typing import Any, Iterable, Iterator

import numpy as np
import onnx
from onnx import helper

from impq_onnx.engine.gradients import SEED_INPUT, ForwardTensors, TensorGradients, explicit_conv_pads
from impq_onnx.errors import ModelError
from impq_onnx.runtime import lap, resolve_threads
from impq_onnx.sensitivity.margins import emit_probe_seeds, probe_seeds, probe_signs, rank_seeds, runner_ups
from impq_onnx.frontend.ops import LayerGeometry
from impq_onnx.sensitivity.per_sample import NormGraph, kernel_square_norms
from impq_onnx.frontend.sites import SiteTable

__all__ = ["GradientSums", "Taps", "tapped_model", "exact_sums", "fast_sums", "sample_chunks"]

logger = logging.getLogger(__name__)

TAP_PREFIX = "impq.sens"
SIGNS_INPUT = f"{TAP_PREFIX}/signs"  # the probe's random signs, [N, R] float64, where the graph picks the runner-ups


@dataclasses.dataclass
class GradientSums:
    kernels: dict[str, np.ndarray]  # layer node -> [kernels] float64
    activations: dict[str, float]  # site tensor -> float
    samples: int = 0
    ties: int = 0
    runner_ups: int = 0  # |S| actually used (the request capped at classes - 1)

    @classmethod
    def empty(cls, sites: SiteTable) -> "GradientSums":
        return cls({layer.node: np.zeros(layer.kernels) for layer in sites.layers},
                   {site.tensor: 0.0 for site in sites.activations})


@dataclasses.dataclass(frozen=True)
class Taps:
    activation: dict[str, str]  # site tensor -> tap tensor
    weight: dict[str, str]  # layer node -> tap tensor of its weight
    output: dict[str, str]  # layer node -> its output tensor
    geometry: dict[str, LayerGeometry]


def tapped_model(proto: onnx.ModelProto, sites: SiteTable) -> tuple[onnx.ModelProto, Taps]:
    """A copy of ``proto`` with activation and weight taps (see the module docstring)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    explicit_conv_pads(model, sites.input_shape)
    graph = model.graph
    nodes = {node.name: node for node in graph.node}
    before: dict[str, list[onnx.NodeProto]] = {}  # node name -> taps to emit just before it
    act, weight, output, geometry = {}, {}, {}, {}
    for site in sites.activations:
        readers = [nodes.get(name) for name in site.layers]
        if any(r is None for r in readers):
            raise ModelError(f"activation site '{site.tensor}': a reading layer is not in the model")
        layers = [sites.layer(name) for name in site.layers]
        sources = {r.input[layer.op.activation_input] for r, layer in zip(readers, layers)}
        if len(sources) != 1:
            raise ModelError(f"activation site '{site.tensor}': its layers read different tensors {sorted(sources)}")
        tap = f"{TAP_PREFIX}/a/{site.tensor}"
        first = min(readers, key=lambda r: list(graph.node).index(r))
        before.setdefault(first.name, []).append(helper.make_node("Identity", [sources.pop()], [tap], name=tap))
        for r, layer in zip(readers, layers):
            r.input[layer.op.activation_input] = tap
        act[site.tensor] = tap
    for layer in sites.layers:
        node = nodes[layer.node]
        tap = f"{TAP_PREFIX}/w/{layer.node}"
        index = layer.op.weight_input
        before.setdefault(node.name, []).append(helper.make_node("Identity", [node.input[index]], [tap], name=tap))
        node.input[index] = tap
        weight[layer.node] = tap
        output[layer.node] = node.output[0]
        geometry[layer.node] = layer.op.geometry(node, layer.weight_shape, layer.kernel_axis)
    ordered = []
    for node in graph.node:
        ordered.extend(before.get(node.name, []))
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    return model, Taps(act, weight, output, geometry)


def sample_chunks(batches: Iterable, chunk: int, samples: int | None) -> Iterator[np.ndarray]:
    """Re-cut ``(x, y)`` / ``x`` batches into arrays of at most ``chunk`` samples, ``samples`` in all."""
    seen = 0
    for batch in batches:
        x = np.asarray(batch[0] if isinstance(batch, (tuple, list)) else batch, np.float32)
        for start in range(0, len(x), chunk):
            part = x[start : start + chunk]
            if samples is not None:
                part = part[: samples - seen]
            if len(part):
                seen += len(part)
                yield part
            if samples is not None and seen >= samples:
                return


def exact_sums(proto: onnx.ModelProto, logits: str, sites: SiteTable, chunks: Iterable[np.ndarray], *,
               runner_up_count: int, threads: int | None = None) -> GradientSums:
    """One backward pass per sample and runner-up, weight gradients straight from onnxruntime."""
    model, taps = tapped_model(proto, sites)
    forward = ForwardTensors(model, logits, (), threads=threads)
    grads = TensorGradients(model, logits, list(taps.activation.values()) + list(taps.weight.values()),
                            threads=threads, input_shape=sites.input_shape)
    lap("sensitivity graph + sessions")
    sums = GradientSums.empty(sites)
    for x in chunks:
        for one in np.split(x, len(x)):
            z, _ = forward(one)
            ups = runner_ups(z, runner_up_count)
            sums.ties += ups.ties
            sums.runner_ups = ups.classes.shape[1]
            for rank in range(ups.classes.shape[1]):
                if ups.inverse_margin[0, rank] == 0:
                    continue
                g = grads(one, rank_seeds(ups, rank))
                for tensor, tap in taps.activation.items():
                    sums.activations[tensor] += float(np.sum(g[tap].astype(np.float64) ** 2))
                for layer in sites.layers:
                    dw = g[taps.weight[layer.node]].astype(np.float64) ** 2
                    other = tuple(a for a in range(dw.ndim) if a != layer.kernel_axis)
                    sums.kernels[layer.node] += dw.sum(axis=other)
            sums.samples += 1
    lap("sensitivity samples")
    return sums


def _add_norms(sums: GradientSums, results: list[dict], sites: SiteTable, taps: Taps, norm_name: dict[str, str],
               scale: float) -> None:
    """Add one pass's in-graph norm sums (a result per replica) to ``sums``, times ``scale``."""
    for tensor in taps.activation:
        sums.activations[tensor] += scale * sum(float(g[norm_name[tensor]]) for g in results)
    for layer in sites.layers:
        sums.kernels[layer.node] += scale * sum(g[norm_name[layer.node]].astype(np.float64) for g in results)


def fast_sums(proto: onnx.ModelProto, logits: str, sites: SiteTable, chunks: Iterable[np.ndarray], *,
              runner_up_count: int, probes: int | None, seed: int = 0, threads: int | None = None,
              rebuild: str = "graph", replicas: int = 1) -> GradientSums:
    """Batched backward passes; per-sample weight gradients rebuilt from layer inputs and output gradients.

    ``probes=None``: one backward per runner-up rank (exact per-sample values). ``probes=P``: ``P``
    Rademacher probes, each combining all runner-ups in one backward pass (unbiased estimate).
    ``rebuild``: ``"graph"`` sums the per-sample norms inside onnxruntime (:class:`NormGraph`),
    ``"numpy"`` fetches layer inputs and output gradients and uses :func:`kernel_square_norms`.
    ``replicas=R > 1``: R sessions of the same graphs, ``threads // R`` intra-op threads each, measure
    the parts of every chunk side by side (as the fine-tune's replicas do: onnxruntime's intra-op
    threading is poor on these small GEMMs). The probe signs are drawn for the whole chunk, so the
    sums equal the single-session ones up to float rounding. With probes and ``rebuild="graph"`` the
    gradient graph picks the runner-ups from its own logits (:func:`emit_probe_seeds`: the same numbers
    as :func:`runner_ups` + :func:`probe_seeds`), so a chunk is one session run per probe, with no
    forward pass before it; where the class count is not known from the graph, a forward pass first.
    """
    if rebuild not in ("graph", "numpy"):
        raise ValueError(f"rebuild must be 'graph' or 'numpy', not {rebuild!r}")
    model, taps = tapped_model(proto, sites)
    inputs = {layer.node: taps.activation[layer.activation] for layer in sites.layers}
    outputs = [taps.output[layer.node] for layer in sites.layers]
    wrt = list(taps.activation.values()) + outputs
    norm_name = {layer.node: f"{TAP_PREFIX}/norm/w/{layer.node}" for layer in sites.layers}
    norm_name.update({tensor: f"{TAP_PREFIX}/norm/a/{tensor}" for tensor in taps.activation})

    def epilogue(graph, gradients, shapes):
        norms = NormGraph(graph, f"{TAP_PREFIX}/norm", shapes)
        for layer in sites.layers:
            norms.layer(taps.geometry[layer.node], inputs[layer.node], gradients[taps.output[layer.node]],
                        norm_name[layer.node])
        for tensor, tap in taps.activation.items():
            norms.activation(gradients[tap], norm_name[tensor])
        return list(norm_name.values())

    in_graph = rebuild == "graph"
    runner_count: dict[str, Any] = {}  # what seed_graph made: the runner-up count, the ties output

    def seed_graph(graph, shapes):
        shape = shapes.get(logits) or []
        classes = shape[-1] if len(shape) == 2 else None
        if not classes or classes < 2:  # unknown until run (or not [N, classes]): a forward pass picks them
            return None
        runner_count["r"] = r = max(1, min(int(runner_up_count), classes - 1))
        runner_count["ties"] = ties = emit_probe_seeds(graph, logits, classes, runner_up_count, SIGNS_INPUT,
                                                       SEED_INPUT, f"{TAP_PREFIX}/seed")
        return ([helper.make_tensor_value_info(SIGNS_INPUT, onnx.TensorProto.DOUBLE, ["N", r])],
                [helper.make_tensor_value_info(ties, onnx.TensorProto.INT64, [])])

    replicas = max(1, int(replicas))
    per = threads if replicas == 1 else max(1, resolve_threads(threads) // replicas)
    # With probes and the norms in the graph, the runner-ups come from the gradient graph's own logits:
    # one run per chunk and probe, no separate forward pass (14 % of the time on ResNet-20).
    grads = TensorGradients(model, logits, wrt, threads=per, input_shape=sites.input_shape,
                            epilogue=epilogue if in_graph else None,
                            seed_graph=seed_graph if in_graph and probes is not None else None)
    fused = grads.seed_in_graph
    forward = None if fused else ForwardTensors(model, logits, () if in_graph else sorted(set(inputs.values())),
                                                threads=per)
    workers = [(forward, grads)] + [(forward and forward.copy(per), grads.copy(per)) for _ in range(replicas - 1)]
    lap("sensitivity graph + sessions")
    rng = np.random.default_rng(seed)
    sums = GradientSums.empty(sites)
    pool = concurrent.futures.ThreadPoolExecutor(replicas) if replicas > 1 else None

    def spread(call, parts: list[tuple]) -> list:
        """``call(worker, *part)`` for each part, on the replicas in parallel (run() releases the GIL)."""
        if pool is None or len(parts) == 1:
            return [call(workers[0], *parts[0])]
        return list(pool.map(call, workers[:len(parts)], *zip(*parts)))

    try:
        for x in chunks:
            parts = list(np.array_split(x, min(replicas, len(x))))
            bounds = np.cumsum([0] + [len(p) for p in parts])
            # a pass: (seed, probe signs) for the whole chunk; fused, the graph makes the seed from the signs
            if fused:
                assert probes is not None
                sums.runner_ups = runner_count["r"]
                passes = [(None, probe_signs(rng, len(x), runner_count["r"])) for _ in range(probes)]
            else:
                outs = spread(lambda w, part: w[0](part), [(part,) for part in parts])
                z = np.concatenate([o[0] for o in outs])
                kept = {name: np.concatenate([o[1][name] for o in outs]) for name in outs[0][1]}
                ups = runner_ups(z, runner_up_count)
                sums.ties += ups.ties
                sums.runner_ups = ups.classes.shape[1]
                seeds = ([rank_seeds(ups, r) for r in range(ups.classes.shape[1])] if probes is None
                         else [probe_seeds(ups, rng) for _ in range(probes)])
                passes = [(seed, None) for seed in seeds if np.any(seed)]
            scale = 1.0 if probes is None else 1.0 / probes
            for index, (seed, signs) in enumerate(passes):
                pieces = [(parts[i], *(None if a is None else a[bounds[i]:bounds[i + 1]] for a in (seed, signs)))
                          for i in range(len(parts))]
                results = spread(lambda w, part, sd, sg: w[1](part, sd, None if sg is None else {SIGNS_INPUT: sg}),
                                 pieces)
                if fused and index == 0:  # the same logits, so the same ties, in every probe
                    sums.ties += sum(int(g[runner_count["ties"]]) for g in results)
                if in_graph:
                    _add_norms(sums, results, sites, taps, norm_name, scale)
                    continue
                for tensor, tap in taps.activation.items():
                    flat = np.concatenate([g[tap] for g in results]).reshape(len(x), -1)
                    sums.activations[tensor] += scale * float(np.einsum("np,np->", flat, flat, dtype=np.float64))
                for layer in sites.layers:
                    dy = np.concatenate([g[taps.output[layer.node]] for g in results])
                    total = kernel_square_norms(taps.geometry[layer.node], kept[inputs[layer.node]], dy).sum(axis=0)
                    sums.kernels[layer.node] += scale * total
            sums.samples += len(x)
    finally:
        if pool is not None:
            pool.shutdown()
    lap("sensitivity samples")
    return sums

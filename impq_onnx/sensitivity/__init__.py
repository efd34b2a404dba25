"""Sensitivity (noise gain) of every weight group and activation site: IMPQ-NOTES "Sensitivity".

For each sample (prediction ``Yhat`` = the model's own argmax) and each runner-up ``i`` in ``S``
(the ``runner_ups`` classes with the smallest ``|Z_i - Z_Yhat|``, capped at classes - 1):

    paper:      M_W,k = 2^-B_k * E_n[ sum_{i in S} sum_{w in W_k} |d(Z_i - Z_Yhat)/dw|^2 / (24 |Z_i - Z_Yhat|^2) ]
                M_A,l = 2^-B_l * E_n[ sum_{i in S} sum_{a in A_l} |d(Z_i - Z_Yhat)/da|^2 / (24 |Z_i - Z_Yhat|^2) ]
    reference:  the authors' code: the weight sum over the group becomes a *mean* over the group and is
                multiplied by ``mean|w_q|`` of the group (``w_q`` the weights quantized by the plan, the
                float weights where the plan keeps them float) and ``2^-B``; the activation sum is
                multiplied by the site's clip (plan clip, else ``max_c(beta + 6|gamma|)``, else 4.0) and
                ``2^-B``; no 1/24. The activation sum stays a sum (IMPQ-NOTES names no mean there).
    step:       the paper's expression with ``2^-B`` replaced by ``Delta^2``, the group's real
                quantization step squared (weights: per kernel, from the plan's scheme and the kernel's
                max|w| or RMS; activations: ``clip * 2^-B``, signed ``clip * 2^-(B-1)``). This is noise
                gain analysis without the paper's assumption that every tensor spans [-1, 1]; one bit
                less multiplies it by 4 instead of 2, which changes values, not the order within one
                bit width.
    measured:   the paper's expression with ``2^-B / 24`` replaced by ``e / 2`` (``Delta^2 / 12`` by
                ``e``), ``e`` the mean squared error of the group's quantizer at its bits, measured: for a
                kernel on its own float weights (the plan's scheme), for an activation site on its values
                in the measured model over the first ``MEASURED_SAMPLES`` samples (its clip and
                signedness from the plan). ``step`` assumes the values fill the quantizer's range
                evenly; after a ReLU most values are zero and quantize exactly, while a normalized image
                input is dense and signed. On MobileNet-V1-CIFAR at 4 bits (float weights) the rank
                correlation of site M with the damage of one site at 3 bits is 0.37 (paper), 0.80
                (step), 0.80 (measured); ResNet-20 -0.12 / 0.25 / 0.53; the Fashion-MNIST demo model
                0.8 / 0.5 / 0.8 (``bench/weighting_truth.py``).

``E_n`` is the mean over all measured samples; (sample, runner-up) pairs whose margin is a tie
(zero, see :mod:`~impq_onnx.sensitivity.margins`) contribute nothing. Batch-norm is in inference
mode. ``B`` is the group's bits in ``plan`` (a layer or network group: :meth:`PrecisionPlan.group_bits`);
a float group (no plan, or ``null`` bits) counts as ``float_bits`` (default 8) — a constant factor
for an all-float model, so the ordering is that of the gradients alone. ``paper`` and ``reference``
use ``2^-B`` as written (the paper's eq. 1 calls it the step squared, ``2^-(B-1)``), so lowering a
group by one bit doubles its ``M``; a uniform quantizer's noise power ``Delta^2/12`` really scales
as ``4^-B`` (the ``step`` weighting).

Two methods:
- ``exact``: one backward pass per (sample, runner-up) at batch 1, weight gradients straight from
  onnxruntime-training. Slow; the reference the tests and the benchmark compare against.
- ``fast``: batched. With inference-mode batch-norm the samples of a batch are independent, so one
  backward pass of ``sum_n seed_n . Z_n`` gives exact per-sample gradients of every activation
  and every layer output at once; ``1/|margin|`` is folded into the seed. Per-sample weight
  gradients are rebuilt from each layer's input and output gradient
  (:mod:`~impq_onnx.sensitivity.per_sample`). ``probes=None`` runs one backward per runner-up rank
  (exact values); ``probes=P`` runs ``P`` Rademacher probes that each combine all runner-ups with
  random signs (``E|sum_r eps_r g_r|^2 = sum_r |g_r|^2``), ``|S|/P`` times cheaper.

Design of the fast path, and why (measured with ``bench/sensitivity.py`` on ResNet-20, 256
CIFAR-10 test images, on the 2-core machine while another job used about one core, load ~4):

- Per-sample activation gradients come from one batched backward pass of ``sum_n seed_n . Z_n``
  (exact: inference batch-norm keeps samples independent). The backward never needs weight
  gradients, so each ``ConvGrad`` is swapped for a ``Conv`` of the output gradient with the flipped,
  transposed weight where the conv has stride 1 (onnxruntime's NCHWc kernels: 2.3x faster than a
  ``ConvTranspose`` over ResNet-20's layers, single-threaded) and for the equivalent
  ``ConvTranspose`` elsewhere (1.4x faster than ``ConvGrad`` on a ResNet-20 layer).
- Per-sample weight gradients are rebuilt from layer inputs and output gradients *inside* the
  onnxruntime session (:class:`~impq_onnx.sensitivity.per_sample.NormGraph`): only per-kernel sums
  leave it. The numpy form (``rebuild="numpy"``) gives the same numbers a little slower
  (170 vs 179 samples/s) and moves every layer input and output gradient through Python.
- The runner-ups of a probe are picked inside the gradient graph from its own logits (float64, the
  numpy arithmetic; the probe's random signs are an input), so one session run per chunk replaces a
  forward pass and then a backward one: 14 % less time on ResNet-20, the same sums bit for bit.
- Runner-ups: ``probes=None`` (one backward per rank: exact, 1e-7 from the exact path, 21
  samples/s) vs Rademacher probes. On a briefly trained ResNet-20 (50 % top-1) one probe runs
  179 samples/s (1.43 CPU-seconds for 256 samples) with Spearman rho against the exact path
  0.9993 over 698 kernels, 0.9985 over 20 layers and 0.9985 over 20 activation sites (worst of
  3 seeds; untrained net: 0.9992 / 0.9985 / 1.0); 2 probes 0.9999 / 1.0 / 1.0 at 80 samples/s.
  The probe noise averages out over samples while the metric spans orders of magnitude, so the
  default is one probe. The exact path: 20 samples/s (the authors' code: 0.33).
- Chunks of at most 32 samples (fewer when a 512 MiB budget of per-sample tensors asks for it):
  32 was the fastest (cache), and memory stays bounded: MobileNet-V1 at 224x224 (1000 classes,
  3-sample chunks) peaks at 670 MiB RSS for 8 samples and 692 MiB for 32.

Which weighting orders better (truth: mismatch vs the float model with only that layer's
weights, or that activation site, at 2 bits; Spearman over 20 layers / 20 sites; 512 samples):
paper 0.05 / 0.60, reference 0.77 / 0.59, step 0.74 / 0.61 (truth at 3 bits: paper 0.36 / 0.53,
reference 0.47 / 0.53, step 0.53 / 0.57). The paper's unscaled ``2^-B`` ignores that layers'
weight ranges differ; both scale-aware forms fix that. ``paper`` stays the default (the spec).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from impq_onnx.events import Event
from impq_onnx.runtime import default_replicas, resolve_threads
from impq_onnx.sensitivity.measure import GradientSums, exact_sums, fast_sums, sample_chunks
from impq_onnx.sensitivity.table import SensitivityTable
from impq_onnx.frontend.sites import GRANULARITIES, SiteTable

__all__ = ["noise_gain", "SensitivityTable", "WEIGHTINGS", "METHODS", "DEFAULT_FLOAT_BITS", "DEFAULT_PROBES"]

logger = logging.getLogger(__name__)

WEIGHTINGS = ("paper", "reference", "step", "measured")
METHODS = ("fast", "exact")
DEFAULT_FLOAT_BITS = 8
DEFAULT_PROBES: int | None = 1
DEFAULT_CLIP = 4.0  # the reference code's activation clip when no batch-norm precedes the site
_MEMORY_BUDGET = 512 * 2**20  # bytes of per-chunk tensors the fast path aims to stay under
MEASURED_SAMPLES = 64  # the first samples whose activations the "measured" weighting quantizes
_MAX_CHUNK = 32  # ResNet-20, 1 probe: 180 samples/s at 32, 160 at 48, 155 at 80, 115 at 128 (cache-bound)


def noise_gain(canonical, sites: SiteTable, batches: Iterable, *, plan=None, granularity: str = "kernel",
               runner_ups: int = 10, weighting: str = "paper", method: str = "fast", samples: int | None = None,
               probes: int | None = DEFAULT_PROBES, float_bits: int = DEFAULT_FLOAT_BITS, chunk: int | None = None,
               threads: int | None = None, seed: int = 0, rebuild: str = "graph", replicas: int | None = None,
               progress: Callable[[Event], None] | None = None) -> SensitivityTable:
    """Measure ``M`` for every weight group (at ``granularity``) and activation site.

    ``canonical``: a :class:`~impq_onnx.frontend.canonical.CanonicalModel`, or an ``onnx.ModelProto`` — the
    float model or a fake-quant model from :func:`impq_onnx.quant.simulate.simulate` (same node names as
    ``sites``). ``batches`` yields ``(x, y)`` or ``x`` arrays (labels are not used); ``samples``
    caps how many samples are read. ``probes``, ``chunk`` (samples per onnxruntime run; default from
    a 512 MiB budget), ``threads``, ``replicas`` (sessions measuring parts of a chunk side by side,
    ``threads // replicas`` threads each; None: one single-threaded session per thread while each
    part keeps 16 samples of a chunk, the fine-tune's rule, which measured 1.4x one two-threaded
    session for ResNet-20 on 2 cores) and ``seed`` (of the probe signs)
    only affect ``method="fast"``.
    ``progress`` gets ``sensitivity`` events: a ``step`` per chunk measured (``step``: samples so far).
    """
    from impq_onnx.quant.simulate import as_proto

    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if probes is not None and probes < 1:
        raise ValueError(f"probes must be a positive number or None, not {probes!r}")
    if plan is not None:
        plan.validate(sites)
    proto = as_proto(canonical)
    start = time.perf_counter()
    size = chunk or _fixed_batch(proto) or _chunk_size(sites)
    if _fixed_batch(proto):
        replicas = 1  # a part of a chunk would be smaller than the batch the graph bakes in
    elif replicas is None:
        replicas = default_replicas(resolve_threads(threads), size)
    chunks = sample_chunks(batches, size, samples)
    kept: list[np.ndarray] = []
    if weighting == "measured":
        chunks = _keeping(chunks, kept, MEASURED_SAMPLES)
    if progress is not None:
        chunks = _reported(chunks, samples, start, progress)
    if method == "exact":
        sums = exact_sums(proto, sites.logits, sites, chunks, runner_up_count=runner_ups, threads=threads)
    else:
        sums = fast_sums(proto, sites.logits, sites, chunks, runner_up_count=runner_ups, probes=probes,
                         seed=seed, threads=threads, rebuild=rebuild,
                         replicas=replicas)
    if sums.samples == 0:
        from impq_onnx.errors import DataError

        raise DataError("sensitivity needs at least one sample; the data yielded none")
    values = _activation_values(proto, sites, kept, threads, seed) if weighting == "measured" else None
    weights, activations = _weigh(sums, sites, proto, plan, granularity, weighting, float_bits, values)
    seconds = time.perf_counter() - start
    label = method if method == "exact" else f"fast/{'ranks' if probes is None else f'probes={probes}'}"
    logger.info("sensitivity of %d samples in %.1f s (%s, %d ties skipped)", sums.samples, seconds, label, sums.ties)
    if progress is not None:
        progress(Event("phase_end", "sensitivity", f"sensitivity of {sums.samples} samples in {seconds:.1f} s "
                       f"({label}, {sums.ties} ties skipped)", sums.samples, samples,
                       {"samples": sums.samples, "seconds": seconds, "ties": sums.ties}))
    return SensitivityTable(weights, activations, granularity, weighting, label, sums.runner_ups, sums.samples,
                            seconds, sums.ties)


def _reported(chunks: Iterable[np.ndarray], samples: int | None, start: float,
              progress: Callable[[Event], None]) -> Iterator[np.ndarray]:
    """``chunks``, with a ``step`` event each time the previous chunk is measured."""
    progress(Event("phase_start", "sensitivity", "", 0, samples))
    seen = 0
    for chunk in chunks:
        yield chunk
        seen += len(chunk)
        speed = seen / max(time.perf_counter() - start, 1e-9)
        total = f"/{samples}" if samples is not None else ""
        progress(Event("step", "sensitivity", f"sensitivity {seen}{total} samples, {speed:.0f} samples/s", seen,
                       samples, {"samples": seen, "samples_per_second": speed}))


def _fixed_batch(proto) -> int | None:
    """The batch a model whose graph bakes it in (the canonical form could not free it) must run at."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None


def _chunk_size(sites: SiteTable) -> int:
    # Per sample the fast path holds each layer's input and output gradient, the activation
    # gradients and onnxruntime's saved forward tensors: about four copies of all of them.
    floats = sum(site.elements for site in sites.activations)
    floats += sum(layer.macs // max(layer.dot_length, 1) for layer in sites.layers)
    per_sample = 4 * 4 * max(floats, 1)
    return int(max(1, min(_MAX_CHUNK, _MEMORY_BUDGET // per_sample)))


def _bits(bits: int | None, float_bits: int) -> int:
    return float_bits if bits is None else bits


def _keeping(chunks: Iterable[np.ndarray], kept: list[np.ndarray], limit: int) -> Iterator[np.ndarray]:
    """``chunks`` unchanged, with copies of their first ``limit`` samples appended to ``kept``."""
    count = 0
    for chunk in chunks:
        if count < limit:
            kept.append(np.array(chunk[: limit - count], copy=True))
            count += len(kept[-1])
        yield chunk


def _activation_values(proto, sites: SiteTable, kept: list[np.ndarray], threads: int | None,
                       seed: int) -> dict[str, np.ndarray]:
    """Every activation site's values on the ``kept`` samples, in the measured (simulated) model: a tensor's
    values before its own quantizer, after those upstream of it."""
    from impq_onnx.quant.simulate import MSE_SAMPLES, site_values

    if not kept:
        return {}
    values, _ = site_values(proto, [site.tensor for site in sites.activations], kept, max_batches=len(kept),
                            keep=MSE_SAMPLES, threads=threads, seed=seed)
    return values


def _weigh(sums: GradientSums, sites: SiteTable, proto, plan, granularity: str, weighting: str, float_bits: int,
           values: dict[str, np.ndarray] | None = None):
    n = sums.samples
    layers = {layer.node: layer for layer in sites.layers}
    mean_abs = _mean_abs_weights(sites, proto, plan) if weighting == "reference" else None
    steps = _weight_steps(sites, proto, plan, float_bits) if weighting == "step" else None
    noise = weight_noise(sites, proto, plan, float_bits) if weighting == "measured" else None
    weights = {}
    for group in sites.weight_groups(granularity):
        bits = _bits(plan.group_bits(group) if plan is not None else None, float_bits)
        total = sum(float(sums.kernels[node][k]) for node, k in group.members)
        if noise is not None:  # Delta^2/12 replaced by the measured mean squared error; 1/24 = 1/(2*12)
            weights[group.name] = sum(float(sums.kernels[node][k]) * float(noise[node][k])
                                      for node, k in group.members) / (2.0 * n)
        elif weighting == "step":
            weights[group.name] = sum(float(sums.kernels[node][k]) * steps[node][k] ** 2
                                      for node, k in group.members) / (24.0 * n)
        elif weighting == "paper":
            weights[group.name] = 2.0 ** -bits * total / (24.0 * n)
        else:
            params = sum(layers[node].kernel_params for node, _ in group.members)
            magnitude = sum(mean_abs[node][k] * layers[node].kernel_params for node, k in group.members) / params
            weights[group.name] = 2.0 ** -bits * (total / (n * params)) * magnitude
    activations = {}
    for site in sites.activations:
        bits = _bits(plan.activations.get(site.tensor) if plan is not None else None, float_bits)
        total = sums.activations[site.tensor] / n
        if weighting == "measured":
            activations[site.tensor] = _activation_noise(site, plan, bits, values or {}) * total / 2.0
        elif weighting == "step":
            from impq_onnx.quant.quantizers import activation_grid

            step = activation_grid(bits, _clip(site, plan), not site.unsigned)[0]
            activations[site.tensor] = step**2 * total / 24.0
        elif weighting == "paper":
            activations[site.tensor] = 2.0 ** -bits * total / 24.0
        else:
            activations[site.tensor] = 2.0 ** -bits * total * _clip(site, plan)
    return weights, activations


def _activation_noise(site, plan, bits: int, values: dict[str, np.ndarray]) -> float:
    """Mean squared error of ``site``'s quantizer at ``bits`` with its clip on its measured values (0 with none)."""
    from impq_onnx.quant.quantizers import quantize_activation

    v = values.get(site.tensor)
    if v is None or not v.size:
        return 0.0
    signed = plan.clips[site.tensor].signed if plan is not None and site.tensor in plan.clips else not site.unsigned
    q = quantize_activation(v, bits, _clip(site, plan), signed)
    return float(np.mean(np.square(q.astype(np.float64) - v.astype(np.float64))))


def weight_noise(sites: SiteTable, proto, plan, float_bits: int) -> dict[str, np.ndarray]:
    """Per layer, per kernel: the mean squared error of the plan's weight quantizer at the kernel's bits (a float
    kernel at ``float_bits``) on the current float weights."""

    def error(scheme, w: np.ndarray, axis: int, bits: list[int]) -> np.ndarray:
        w = w.astype(np.float32)
        q = scheme.quantize(w, bits, axis)
        axes = tuple(a for a in range(w.ndim) if a != axis)
        return np.square(q.astype(np.float64) - w.astype(np.float64)).mean(axis=axes)

    return _per_layer(sites, proto, plan, float_bits, error)


def _clip(site, plan) -> float:
    if plan is not None and plan.clips.get(site.tensor) is not None and plan.clips[site.tensor].value is not None:
        return float(plan.clips[site.tensor].value)
    if site.batchnorm is not None:
        return float(site.batchnorm.clip)
    return DEFAULT_CLIP


def _weight_steps(sites: SiteTable, proto, plan, float_bits: int) -> dict[str, np.ndarray]:
    """Per layer, per kernel: the quantization step of the plan's scheme at the kernel's bits."""
    return _per_layer(sites, proto, plan, float_bits,
                      lambda scheme, w, axis, bits: scheme.sensitivity_steps(w, axis, bits))


def _per_layer(sites: SiteTable, proto, plan, float_bits: int, measure) -> dict[str, np.ndarray]:
    """Per layer: ``measure(scheme, w, kernel_axis, bits)``, ``w`` the layer's float weight, ``bits`` its kernels'
    bits in ``plan`` (a float kernel at ``float_bits``), ``scheme`` the plan's weight scheme."""
    from onnx import numpy_helper

    from impq_onnx.quant.schemes import weight_scheme

    scheme = weight_scheme(plan.weight_scheme if plan is not None else "midrise-max")
    initializers = {t.name: t for t in proto.graph.initializer}
    result = {}
    for layer in sites.layers:
        w = numpy_helper.to_array(initializers[layer.weight])
        bits = plan.weights[layer.node] if plan is not None else [None] * layer.kernels
        result[layer.node] = measure(scheme, w, layer.kernel_axis, [_bits(b, float_bits) for b in bits])
    return result


def _mean_abs_weights(sites: SiteTable, proto, plan) -> dict[str, np.ndarray]:
    """Per layer, per kernel ``mean|w_q|`` (quantized by the plan where it gives bits)."""
    from onnx import numpy_helper

    from impq_onnx.quant.schemes import weight_scheme

    initializers = {t.name: t for t in proto.graph.initializer}
    result = {}
    for layer in sites.layers:
        w = numpy_helper.to_array(initializers[layer.weight]).astype(np.float32)
        if plan is not None and any(b is not None for b in plan.weights[layer.node]):
            w = weight_scheme(plan.weight_scheme).quantize(w, plan.weights[layer.node], layer.kernel_axis)
        axes = tuple(a for a in range(w.ndim) if a != layer.kernel_axis)
        result[layer.node] = np.abs(w).astype(np.float64).mean(axis=axes)
    return result

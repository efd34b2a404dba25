"""Compare the integer activation codes of a lowered model with the simulation's, site by site.

verify runs both models exactly as written (graph optimizations and pre-packing off), so that they
compute the same float operations in the same order; then every activation code and every logit is
equal, and :func:`code_difference` finds nothing. Where a lowered graph computes a site's input in
another float order (an exporter's or a target's rewrite that is the same sum, reordered), a value
lying on a rounding boundary (``(k + 1/2) * step``) may round to the neighbouring code; everything
downstream then differs too. So a difference is judged where it starts: the lowered model runs again
with every quantized layer input taken from the simulation (``forced``), and each site's codes,
computed from the same inputs as the simulation's, may then differ only by one step and only where
the simulation's pre-quantization value lies within :data:`TIE_EPSILON` (relative, in code units) of a
rounding boundary. Anything else is reported as the first site and index that differs.

Weights, scales, zero points and clip bounds are compared bit for bit elsewhere
(:mod:`impq_onnx.lowering.exact_codes`), so no change of those hides behind a tie.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper

from impq_onnx.frontend.sites import SiteTable
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.quantizers import activation_grid

__all__ = ["Probe", "probes", "exposed", "forced", "code_difference", "TIE_EPSILON", "FORCED_SUFFIX"]

# How near a rounding boundary (in code units, relative to max(1, |code|)) a value must lie for a one-step
# difference to count as float reordering: 2^-12 of a code. A graph change that scales a site by more than
# that moves codes away from ties and is reported.
TIE_EPSILON = 2.0**-12
FORCED_SUFFIX = "/impq_forced"


@dataclasses.dataclass(frozen=True)
class Probe:
    """One quantized activation site: the tensor its layers read in each model, and the grid."""

    site: str  # the site tensor (pre-quantization, in the simulation)
    lowered: str  # the quantized tensor the site's first layer reads in the lowered (runnable) model
    simulated: str  # the same in the simulation
    step: float
    lo: int
    hi: int
    clip: float
    signed: bool


def probes(lowered: onnx.ModelProto, simulated: onnx.ModelProto, plan: PrecisionPlan,
           sites: SiteTable) -> list[Probe]:
    """The quantized sites found in both graphs (through their first reading layer, by node name), in
    the order of ``sites``; a site whose layer either graph lacks is left to the logits."""
    low_nodes = {n.name: n for n in lowered.graph.node}
    sim_nodes = {n.name: n for n in simulated.graph.node}
    low_made = {o for n in lowered.graph.node for o in n.output}
    found, seen = [], set()
    for site in sites.activations:
        bits, clip = plan.activations.get(site.tensor), plan.clips.get(site.tensor)
        if bits is None or clip is None or clip.value is None or not site.layers:
            continue
        reader = site.layers[0]
        index = sites.layer(reader).op.activation_input
        a, b = low_nodes.get(reader), sim_nodes.get(reader)
        if a is None or b is None or index >= len(a.input) or index >= len(b.input):
            continue
        low, sim = a.input[index], b.input[index]
        if low == site.tensor or sim == site.tensor or low not in low_made or low in seen:
            continue  # not quantized in one of them (reported by the other checks), or shared
        seen.add(low)
        step, lo, hi = activation_grid(bits, clip.value, clip.signed)
        found.append(Probe(site.tensor, low, sim, step, lo, hi, float(clip.value), clip.signed))
    return found


def exposed(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``names`` (float tensors), after its own outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output} | {i.name for i in out.graph.input}
    for name in dict.fromkeys(names):
        if name not in have:
            out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return out


def forced(model: onnx.ModelProto, found: list[Probe]) -> onnx.ModelProto:
    """A copy of the lowered ``model`` whose layers read each probe's quantized tensor from a new graph input
    (``<tensor>/impq_forced``, fed the simulation's values); the model's own quantized tensors are extra outputs."""
    out = exposed(model, [p.lowered for p in found])
    renamed = {p.lowered: p.lowered + FORCED_SUFFIX for p in found}
    for node in out.graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    out.graph.input.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in renamed.values())
    return out


def _codes(values: np.ndarray, probe: Probe) -> np.ndarray:
    return np.rint(np.asarray(values, np.float64) / probe.step)


def _near_tie(pre: np.ndarray, probe: Probe) -> np.ndarray:
    """Where the simulation's pre-quantization value (clipped as the quantizer clips) lies within
    TIE_EPSILON of a rounding boundary, in code units."""
    c = np.float32(probe.clip)
    u = np.clip(np.asarray(pre, np.float32), -c if probe.signed else np.float32(0), c).astype(np.float64) / probe.step
    return np.abs(np.abs(u - np.floor(u)) - 0.5) <= TIE_EPSILON * np.maximum(1.0, np.abs(u))


def code_difference(probe: Probe, got: np.ndarray, want: np.ndarray, pre: np.ndarray | None,
                    offset: int = 0) -> tuple[int, str | None]:
    """``(ties, problem)``: how many codes of ``got`` differ from ``want`` by one step at a rounding tie of
    ``pre``, and a one-line description of the first other difference (None: there is none)."""
    if got.shape != want.shape:
        return 0, (f"activation '{probe.site}': shape {list(got.shape)} in the lowered model, {list(want.shape)} in "
                   "the simulation; lower it again from the float model and the plan")
    a, b = _codes(got, probe), _codes(want, probe)
    differ = (a != b) & ~(np.isnan(a) & np.isnan(b))  # NaN codes agree only with NaN
    if not differ.any():
        return 0, None
    tie = differ & (np.abs(a - b) == 1)
    if pre is not None and pre.shape == got.shape:
        tie &= _near_tie(pre, probe)
    else:
        tie[...] = False
    bad = differ & ~tie
    if not bad.any():
        return int(tie.sum()), None
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    sample, rest = index[0] + offset, index[1:]
    value = "" if pre is None or pre.shape != got.shape else f" (value before quantization {float(pre[index]):.9g})"
    return int(tie.sum()), (
        f"activation '{probe.site}': code {a[index]:g} in the lowered model, {b[index]:g} in the simulation at "
        f"sample {sample} index {list(rest)}{value}, not a rounding tie; the lowered graph computes this site "
        "differently from the simulation: lower it again from the float model and the plan")

"""Re-derive every quantization parameter of a lowered model from the float model and the plan; compare exactly.

Logits alone cannot prove a lowering: one weight code changed inside its range (``-1 -> 1`` in a 3-bit
kernel) moves the logits by a fraction and may keep every top-1 prediction, and a negated scale with
negated codes computes the same values. So :func:`exact_mismatches` lowers the float model under the
plan again (the same code path that wrote the file, in the file's format) and reads, from both graphs
alike, what each layer and activation site is actually computed from, following the graph from the
layer node (not the tensor names):

- per layer weight: the integer codes (QDQ: the stored integers; QONNX and encodings: the stored
  on-grid floats divided by their per-channel scale), the per-channel scales (each must be finite and
  > 0), the zero points (values and integer type), the stored values themselves, the float kernels
  added after the dequantization, and the quantizer's attributes (axis, widths, signedness, rounding);
- per activation site: the scales and zero points of the QuantizeLinear and the DequantizeLinear (or
  the ``Quant`` node), the Clip bounds that narrow the integer range, and the types;
- the sidecar and every attachment the target writes (the encodings JSON: per-channel scales,
  offsets, widths), compared key by key. A target that stores on-grid float weights says where their
  scales are (``Target.weight_scales``), and the codes are the values divided by them.

Everything must be equal bit for bit. The first difference of each tensor is reported as one line
naming the tensor, the layer, the channel and the index.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from impq_onnx.frontend.sites import QuantLayer, SiteTable
from impq_onnx.lowering.targets import get_target
from impq_onnx.quant.plan import PrecisionPlan

__all__ = ["exact_mismatches"]

_QUANTIZERS = ("DequantizeLinear", "Quant")


class _Graph:
    """Index of one ONNX graph: nodes by name, producers by output, initializers by name."""

    def __init__(self, lowered: Any) -> None:
        proto = get_target(lowered.format).quantizer_graph(lowered)
        self.lowered = lowered
        self.nodes = {n.name: n for n in proto.graph.node}
        self.producers = {o: n for n in proto.graph.node for o in n.output}
        self.inits = {t.name: t for t in proto.graph.initializer}

    def array(self, name: str) -> np.ndarray | None:
        tensor = self.inits.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def stored(self, name: str) -> np.ndarray:
        """An initializer that must exist (KeyError otherwise: verify reports the file as unreadable)."""
        return numpy_helper.to_array(self.inits[name])


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def _broadcast(scale: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape) if scale.size > 1 else scale.reshape([1] * ndim)


def _codes_of(values: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """Integer codes of on-grid float values (``values / scale``, rounded); a zero scale gives code 0."""
    s = _broadcast(np.asarray(scale, np.float32), values.ndim, axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.rint(values.astype(np.float32) / s)
    return np.nan_to_num(codes, nan=0.0, posinf=0.0, neginf=0.0).astype(np.int64)


def _weight_record(g: _Graph, layer: QuantLayer) -> dict[str, Any] | str:
    """What the layer's weight is computed from, or a one-line reason why it cannot be read."""
    node = g.nodes.get(layer.node)
    if node is None or len(node.input) < 2:
        return f"layer '{layer.node}' is not in the lowered model"
    name = node.input[1]
    record: dict[str, Any] = {}
    producer = g.producers.get(name)
    if producer is not None and producer.op_type == "Add":
        if len(producer.input) != 2 or producer.input[1] not in g.inits:
            return f"layer '{layer.node}': the Add before its weight is not weight + float kernels"
        record["float_kernels"] = g.array(producer.input[1])
        name = producer.input[0]
        producer = g.producers.get(name)
    if producer is None:
        if name not in g.inits:
            return f"layer '{layer.node}': its weight '{name}' is neither an initializer nor a quantizer output"
        return _folded_weight(g, layer, name, record)
    if (producer.op_type not in _QUANTIZERS or any(i not in g.inits for i in producer.input)
            or len(producer.input) < (4 if producer.op_type == "Quant" else 2)):
        return f"layer '{layer.node}': its weight comes from {producer.op_type} '{producer.name}', not a quantizer"
    values, scale = g.array(producer.input[0]), g.array(producer.input[1])
    assert values is not None and scale is not None
    attrs = _attrs(producer)
    record.update(op=producer.op_type, tensor=producer.input[0], values=values, scale=scale.reshape(-1),
                  zero_point=g.array(producer.input[2]) if len(producer.input) > 2 else None, attrs=attrs)
    if producer.op_type == "DequantizeLinear":
        record["codes"] = values.astype(np.int64)
        record["axis"] = attrs.get("axis", 1)
    else:
        record["codes"] = _codes_of(values, scale.reshape(-1), layer.kernel_axis)
        record["bitwidth"] = g.array(producer.input[3])
    return record


def _folded_weight(g: _Graph, layer: QuantLayer, name: str, record: dict[str, Any]) -> dict[str, Any] | str:
    """A weight stored as on-grid float values (the encodings target, say) or left float; its per-kernel
    scales are where the output target keeps them (``Target.weight_scales``), read through the sidecar."""
    from impq_onnx.lowering.targets import get_target

    values = g.array(name)
    assert values is not None
    record.update(op="initializer", tensor=name, values=values)
    entry = g.lowered.sidecar.get("weights", {}).get(layer.node)
    if entry is None or all(b is None for b in entry["bits"]):
        return record
    scale = np.asarray(get_target(g.lowered.format).weight_scales(g.lowered, entry, g.stored), np.float32).reshape(-1)
    moved = np.moveaxis(values, layer.kernel_axis, 0)
    if len(scale) != len(moved) or len(entry["bits"]) != len(moved):
        return f"weight '{name}' (layer '{layer.node}'): {len(scale)} scales for {len(moved)} kernels"
    quantized = np.array([b is not None for b in entry["bits"]]).reshape([-1] + [1] * (moved.ndim - 1))
    codes = np.where(quantized, np.moveaxis(_codes_of(values, scale, layer.kernel_axis), layer.kernel_axis, 0), 0)
    record.update(codes=np.moveaxis(codes, 0, layer.kernel_axis), scale=np.where(quantized.reshape(-1), scale, 1))
    return record


def _activation_record(g: _Graph, layer: str) -> dict[str, Any] | str:
    """What the quantized input of ``layer`` is computed from: its quantizer chain's constants."""
    node = g.nodes.get(layer)
    if node is None or not node.input:
        return f"layer '{layer}' is not in the lowered model"
    name = node.input[0]
    record: dict[str, Any] = {}
    chain: list[onnx.NodeProto] = []
    producer = g.producers.get(name)
    while (producer is not None and len(chain) < 3  # at most DQ <- Q <- Clip; also ends a cyclic graph
           and producer.op_type in ("DequantizeLinear", "QuantizeLinear", "Quant", "Clip") and producer.input):
        chain.append(producer)
        if producer.op_type == "Quant" or producer.op_type == "Clip":
            break
        producer = g.producers.get(producer.input[0])
    for position, step in enumerate(chain):
        constants = [g.array(i) if i in g.inits else i for i in step.input[1:]]
        record[f"{position}:{step.op_type}"] = (constants, _attrs(step))
    return record


def _differ(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes()
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or any(_differ(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() != b.keys() or any(_differ(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return False
    return type(a) is not type(b) or a != b


def _bitwise(a: np.ndarray) -> np.ndarray:
    """Floats as their bit patterns, so -0.0 differs from 0.0 and NaN equals the same NaN."""
    return a.view(f"u{a.itemsize}") if a.dtype.kind == "f" else a


def _first_index(a: np.ndarray, b: np.ndarray) -> tuple[int, ...] | None:
    if a.shape != b.shape or a.dtype != b.dtype:
        return None
    where = np.argwhere(_bitwise(a) != _bitwise(b))
    return tuple(int(i) for i in where[0]) if len(where) else None


def _compare_weight(layer: QuantLayer, got: dict[str, Any], want: dict[str, Any]) -> str | None:
    tensor = f"weight '{got.get('tensor')}' (layer '{layer.node}')"
    if got.get("op") != want.get("op"):
        return f"{tensor}: stored through {got.get('op')}, expected {want.get('op')}"
    scale = got.get("scale")
    if scale is not None:
        bad = np.flatnonzero(~(np.isfinite(scale) & (scale > 0)))
        if len(bad):
            value = scale.reshape(-1)[bad[0]].item()
            return f"{tensor} channel {bad[0]}: scale {value!r} is not a positive finite number"
    for key in ("codes", "scale", "zero_point", "values", "float_kernels"):
        a, b = got.get(key), want.get(key)
        if not _differ(a, b):
            continue
        if a is None or b is None:
            return f"{tensor}: {key} {'missing' if a is None else 'unexpected'}"
        a, b = np.asarray(a), np.asarray(b)
        if key in ("codes", "values", "float_kernels") and a.shape == b.shape:
            index = _first_index(a, b)
            if index is not None:
                channel = index[layer.kernel_axis] if len(index) > layer.kernel_axis else 0
                return (f"{tensor} channel {channel} index {list(index)}: {key[:-1].replace('_', ' ')} "
                        f"{a[index].item()!r}, the float model and the plan give {b[index].item()!r}")
        if key in ("scale", "zero_point"):
            index = _first_index(a, b)
            if index is not None:
                return (f"{tensor} channel {index[0] if index else 0}: {key.replace('_', ' ')} {a[index].item()!r}, "
                        f"the float model and the plan give {b[index].item()!r}")
        return (f"{tensor}: {key.replace('_', ' ')} {a.dtype}{list(a.shape)} differs from the "
                f"{b.dtype}{list(b.shape)} the float model and the plan give")
    for key in ("axis", "attrs"):
        if _differ(got.get(key), want.get(key)):
            return f"{tensor}: {key} {got.get(key)!r}, the float model and the plan give {want.get(key)!r}"
    a, b = got.get("bitwidth"), want.get("bitwidth")
    if _differ(a, b) and not (a is not None and b is not None and a.size == 1 and float(a) == float(np.max(b))):
        return f"{tensor}: bit width {a!r}, the float model and the plan give {b!r}"
    return None


def _compare_activation(tensor: str, layer: str, got: dict[str, Any], want: dict[str, Any]) -> str | None:
    where = f"activation '{tensor}' (input of layer '{layer}')"
    for key, value in got.items():
        if not key.endswith("Clip"):
            scale = value[0][0]
            if isinstance(scale, np.ndarray) and not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
                return f"{where}: {key.split(':')[1]} scale {scale!r} is not a positive finite number"
    if got.keys() != want.keys():
        return (f"{where}: quantizer chain {[k.split(':')[1] for k in got]}, the float model and the plan give "
                f"{[k.split(':')[1] for k in want]}")
    for key in want:
        if not _differ(got[key], want[key]):
            continue
        op = key.split(":")[1]
        names = {"Clip": ("min", "max"), "Quant": ("scale", "zero point", "bit width")}.get(op, ("scale", "zero point"))
        (got_consts, got_attrs), (want_consts, want_attrs) = got[key], want[key]
        for i, name in enumerate(names):
            a = got_consts[i] if i < len(got_consts) else None
            b = want_consts[i] if i < len(want_consts) else None
            if _differ(a, b):
                return f"{where}: {op} {name} {a!r}, the float model and the plan give {b!r}"
        return f"{where}: {op} attributes {got_attrs!r}, the float model and the plan give {want_attrs!r}"
    return None


def _json_difference(got: Any, want: Any, path: str) -> str | None:
    """The first place (``a/b/3/scale``) where two JSON documents differ, with both values; None if equal."""
    if isinstance(got, dict) and isinstance(want, dict):
        for key in sorted(set(got) | set(want), key=str):
            if key not in got or key not in want:
                return f"{path}/{key}: {'missing' if key not in got else 'unexpected'}"
            found = _json_difference(got[key], want[key], f"{path}/{key}")
            if found:
                return found
        return None
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return next((d for i, (a, b) in enumerate(zip(got, want)) if (d := _json_difference(a, b, f"{path}/{i}"))),
                    None)
    return None if not _differ(got, want) else f"{path}: {got!r}, the float model and the plan give {want!r}"


def exact_mismatches(lowered, canonical, plan: PrecisionPlan, sites: SiteTable) -> list[str]:
    """One line per weight, activation, sidecar or attachment whose lowered contents differ from a fresh
    lowering of ``canonical`` under ``plan`` in the same format."""
    from impq_onnx.lowering.lower import lower

    options = get_target(lowered.format).options_of(lowered)
    expected = lower(canonical, plan, sites, format=lowered.format, channel_bitwidth=True, **options)
    got, want = _Graph(lowered), _Graph(expected)
    problems: list[str] = []
    sidecar = {k: v for k, v in lowered.sidecar.items() if k != "model"}  # the file name is set when written
    found = _json_difference(sidecar, {k: v for k, v in expected.sidecar.items() if k != "model"}, "sidecar")
    if found:
        problems.append(found)
    for suffix in sorted(set(lowered.attachments) | set(expected.attachments)):
        found = _json_difference(lowered.attachments.get(suffix), expected.attachments.get(suffix), f"'{suffix}'")
        if found:
            problems.append(found)
    unwalked = False  # a quantizer layout the walk below does not know (qonnx width groups): compared as tensors
    for layer in sites.layers:
        a, b = _weight_record(got, layer), _weight_record(want, layer)
        if isinstance(b, str):
            unwalked = True
            continue
        problem = a if isinstance(a, str) else _compare_weight(layer, a, b)
        if problem:
            problems.append(problem)
    for site in sites.activations:
        for reader in site.layers:
            a, b = _activation_record(got, reader), _activation_record(want, reader)
            problem = a if isinstance(a, str) else (b if isinstance(b, str) else
                                                    _compare_activation(site.tensor, reader, a, b))
            if problem:
                problems.append(problem)
                break
    if unwalked:
        problems += _initializer_mismatches(got, want)
    return problems


def _initializer_mismatches(got: _Graph, want: _Graph) -> list[str]:
    """Every initializer of the fresh lowering, compared bit for bit with the file's (first index named)."""
    problems = []
    for name, tensor in want.inits.items():
        have = got.array(name)
        expected = numpy_helper.to_array(tensor)
        if have is None:
            problems.append(f"initializer '{name}': missing, the float model and the plan give one")
        elif have.dtype != expected.dtype or have.shape != expected.shape:
            problems.append(f"initializer '{name}': {have.dtype}{list(have.shape)}, the float model and the plan "
                            f"give {expected.dtype}{list(expected.shape)}")
        elif (index := _first_index(have, expected)) is not None:
            problems.append(f"initializer '{name}' index {list(index)}: {have[index]!r}, the float model and the plan "
                            f"give {expected[index]!r}")
    return problems

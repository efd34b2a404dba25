"""Give a lowered model the interface of the model the user gave, and take it back off for checks.

The canonical form (:mod:`impq_onnx.frontend.canonical`) has one float32 input and one output, the
logits: a trailing Softmax/LogSoftmax and no-op tails are stripped, second outputs dropped, float16
widened. A deployment pipeline feeds and reads the model by name and type, so what is written must
keep the original's interface. :func:`restore_interface` grafts the original's own nodes that compute
every original output from tensors the lowered core also has (the logits, the features, ...) onto the
lowered model, in the original's dtypes, with a ``Cast`` where a float16 tensor meets the float32
core; the graph input and outputs are the original's (names, element types, declared shapes). Only
weights and quantizers differ from the original.

:func:`core_view` is the inverse used by ``verify``: the float32 logits-only model (input and logits
named as in the canonical form) that the simulation is compared with, exactly. What it needs is kept
in ``metadata_props["impq.interface"]`` (JSON ``{"input": <original input>, "core_input": <the float32
tensor the core reads>, "logits": <core logits tensor>}``).
"""

from __future__ import annotations

import json
import logging

import onnx
from onnx import TensorProto, helper

from impq_onnx.errors import ModelError

__all__ = ["INTERFACE_KEY", "restore_interface", "core_view", "interface_of"]

logger = logging.getLogger(__name__)

INTERFACE_KEY = "impq.interface"
_PREFIX = "impq.interface/"
# Element types the canonical form widens to float32 (Float16ToFloat32Pass).
_WIDENED = (TensorProto.FLOAT16,)


def interface_of(proto: onnx.ModelProto) -> dict:
    """Names, element types and shapes of the non-initializer inputs and of the outputs of ``proto``."""
    initializers = {t.name for t in proto.graph.initializer}

    def describe(value: onnx.ValueInfoProto) -> dict:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
        return {"name": value.name, "dtype": tensor.elem_type, "shape": dims if tensor.HasField("shape") else None}

    return {"inputs": [describe(v) for v in proto.graph.input if v.name not in initializers],
            "outputs": [describe(v) for v in proto.graph.output]}


def _default_opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def _types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of ``proto`` that shape inference can tell."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False)
    except Exception:  # noqa: BLE001 - an uninferable graph keeps the declared types only
        inferred = proto
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for node in graph.node:
        if node.op_type == "Cast" and node.output:
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None:
                types.setdefault(node.output[0], to)
    return types


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for value in (*graph.output, *graph.value_info):
        if value.name == old:
            value.name = new


def restore_interface(lowered: onnx.ModelProto, original: onnx.ModelProto, *, logits: str,
                      label: str = "<model>", batch_free: bool = False) -> onnx.ModelProto:
    """``lowered`` (a lowered canonical model: one float32 input, output ``logits``; modified in place and
    returned) with the input and every output of ``original`` (the model as the user gave it).

    ``batch_free``: the core computes any batch although the interface declares a static one (the canonical
    form freed it); :func:`core_view` then declares the batch dynamic, so verification runs any batch size."""
    graph = lowered.graph
    original = _at_opset(original, _default_opset(lowered), label)
    types = _types(original)
    source = original.graph
    original_inits = {t.name: t for t in source.initializer}
    (image,) = [v for v in source.input if v.name not in original_inits][:1] or [None]
    if image is None or len(graph.input) != 1 or graph.input[0].name != image.name:
        raise ModelError(f"{label}: the lowered model's input does not match the original's; lower it again")
    found = next((v for v in graph.output if v.name == logits), None)
    if found is None:
        raise ModelError(f"{label}: the lowered model has no logits output '{logits}'")
    core_output = onnx.ValueInfoProto()
    core_output.CopyFrom(found)
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    available |= {out for node in graph.node for out in node.output if out}
    node_names = {node.name for node in graph.node}
    producers = _producers(source)

    # The original nodes every original output needs, back to tensors the lowered core has.
    needed: set[int] = set()
    boundary: list[str] = []
    initializers: list[str] = []
    stack = [v.name for v in source.output]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in available:
            boundary.append(name)
        elif name in original_inits:
            initializers.append(name)
        elif name in producers:
            node = producers[name]
            needed.add(id(node))
            stack.extend(node.input)
        else:
            raise ModelError(f"{label}: output tensor '{name}' of the original cannot be rebuilt on the lowered "
                             "model; pass --output to pick the logits")

    core_input, logits_name = image.name, logits
    new_nodes: list[onnx.NodeProto] = []
    # A float16 input: the graph takes float16 under its name, a Cast feeds the float32 core.
    if image.type.tensor_type.elem_type in _WIDENED:
        core_input = f"{image.name}/float32"
        _rename(graph, image.name, core_input)
        graph.input[0].name = image.name
        graph.input[0].type.tensor_type.elem_type = image.type.tensor_type.elem_type
        graph.node.insert(0, helper.make_node("Cast", [image.name], [core_input], to=TensorProto.FLOAT,
                                              name=f"{_PREFIX}{image.name}/to_float32"))
    # Core tensors of a type the canonical form widened: an original output keeps its name on a Cast
    # (the core tensor is renamed), a tensor the grafted nodes read is read through a cast copy.
    output_names = {v.name for v in source.output}
    feeds: dict[str, str] = {}
    for name in boundary:
        wanted = types.get(name)
        if name == image.name or wanted not in _WIDENED:
            continue
        type_name = TensorProto.DataType.Name(wanted).lower()
        if name in output_names:
            core_name = f"{name}/float32"
            _rename(graph, name, core_name)
            if name == logits_name:
                logits_name = core_name
            new_nodes.append(helper.make_node("Cast", [core_name], [name], to=wanted,
                                              name=f"{_PREFIX}{name}/to_{type_name}"))
        else:
            feeds[name] = f"{name}/{type_name}"
            new_nodes.append(helper.make_node("Cast", [name], [feeds[name]], to=wanted,
                                              name=f"{_PREFIX}{feeds[name]}"))
    for node in source.node:
        if id(node) not in needed:
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for i, name in enumerate(copy.input):
            copy.input[i] = feeds.get(name, name)
        if copy.name in node_names or not copy.name:
            copy.name = f"{_PREFIX}{copy.name or copy.op_type}"
        new_nodes.append(copy)
    graph.node.extend(new_nodes)
    present = {t.name for t in graph.initializer}
    graph.initializer.extend(original_inits[n] for n in initializers if n not in present)
    domains = {o.domain for o in lowered.opset_import}
    lowered.opset_import.extend(o for o in original.opset_import if o.domain not in domains)

    del graph.output[:]
    graph.output.extend(source.output)
    _keep_static_batch(graph, image)
    if logits_name not in output_names:  # the core's logits keep their shape as value_info, for core_view
        kept = onnx.ValueInfoProto()
        kept.CopyFrom(core_output)
        kept.name = logits_name
        graph.value_info.append(kept)
    entry = next((p for p in lowered.metadata_props if p.key == INTERFACE_KEY), None)
    if entry is None:
        entry = lowered.metadata_props.add()
        entry.key = INTERFACE_KEY
    info = {"input": image.name, "core_input": core_input, "logits": logits_name}
    if batch_free:
        info["batch_free"] = True
    entry.value = json.dumps(info, sort_keys=True)
    logger.debug("%s: interface restored: %d original nodes grafted, core input %r, logits %r", label,
                 len(needed), core_input, logits_name)
    return lowered


def _keep_static_batch(graph: onnx.GraphProto, image: onnx.ValueInfoProto) -> None:
    """Where lowering fixed a batch the original leaves free (``--static-batch`` for QONNX tools), the
    outputs declare it too."""
    lowered_dims = graph.input[0].type.tensor_type.shape.dim
    original_dims = image.type.tensor_type.shape.dim
    if len(lowered_dims) == len(original_dims):  # "any size" written as -1 (paddle2onnx) stays as written
        for lowered_dim, original_dim in zip(lowered_dims, original_dims):
            if original_dim.HasField("dim_value") and original_dim.dim_value < 0:
                lowered_dim.CopyFrom(original_dim)
    if not lowered_dims or not lowered_dims[0].HasField("dim_value") or (
            original_dims and original_dims[0].HasField("dim_value")):
        return
    for output in graph.output:
        dims = output.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = lowered_dims[0].dim_value


def _at_opset(original: onnx.ModelProto, opset: int, label: str) -> onnx.ModelProto:
    """``original`` converted up to ``opset`` when it is older (its tail nodes join a graph of that opset)."""
    if _default_opset(original) >= opset:
        return original
    from onnx import version_converter

    try:
        return version_converter.convert_version(original, opset)
    except Exception as exc:  # the converter raises bare RuntimeErrors with C++ messages
        raise ModelError(f"{label}: cannot convert the original's opset {_default_opset(original)} to {opset} "
                         f"to restore its outputs ({exc}); re-export with opset >= {opset}") from exc


def core_view(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The float32 input -> logits model inside a model :func:`restore_interface` wrote (``proto`` itself
    when it has no restored interface): input named as the original's, the core logits the only output."""
    meta = {p.key: p.value for p in proto.metadata_props}
    if INTERFACE_KEY not in meta:
        return proto
    info = json.loads(meta[INTERFACE_KEY])
    view = onnx.ModelProto()
    view.CopyFrom(proto)
    graph = view.graph
    producers = _producers(graph)
    keep: set[int] = set()
    stack, seen = [info["logits"]], set()
    while stack:
        name = stack.pop()
        if not name or name in seen or name == info["core_input"]:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(node.input)
    nodes = [n for n in graph.node if id(n) in keep]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    logits = next((v for v in (*graph.value_info, *graph.output) if v.name == info["logits"]), None)
    output = onnx.ValueInfoProto()
    if logits is not None:
        output.CopyFrom(logits)
    else:
        output.CopyFrom(helper.make_tensor_value_info(info["logits"], TensorProto.FLOAT, None))
    del graph.output[:]
    graph.output.append(output)
    graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    if info.get("batch_free"):  # the declared static batch is the interface's; the core computes any batch
        for value in (graph.input[0], graph.output[0]):
            dims = value.type.tensor_type.shape.dim
            if len(dims):
                dims[0].Clear()
                dims[0].dim_param = "N"
    if info["core_input"] != info["input"]:
        _rename(graph, info["core_input"], info["input"])
    del graph.value_info[:]
    return view

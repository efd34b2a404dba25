"""Load any exported ONNX classifier into one canonical form.

Canonical means: weights are initializers (also when they arrived as ``Constant`` nodes or as
graph inputs of an IR 3 file), every tensor is float32 (float16 exports are widened), the
default-domain opset is at least 13, external data is loaded, nodes and values have unique
names, and the graph has exactly one output: the logits (a trailing Softmax/LogSoftmax is
stripped and remembered in :attr:`CanonicalModel.head`). Later stages see only this form.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import (
    LiftConstantsToInitializersPass,
    NameFixPass,
    RemoveInitializersFromInputsPass,
    RemoveUnusedNodesPass,
)

from impq_onnx.errors import ModelError
from impq_onnx.frontend.model_file import check_opset, check_tensor_sizes, read_model, read_model_digest
from impq_onnx.frontend.ops import layer_op
from impq_onnx.frontend.passes import Float16ToFloat32Pass, NameNodesPass, StripClassifierHeadPass
from impq_onnx.frontend.passes.dynamic_batch import (
    BATCH_SYMBOL,
    DynamicBatchPass,
    batch_is_free,
    declared_batch,
    restore_declared_batch,
)
from impq_onnx.frontend.passes.fold_constant_weights import FoldConstantWeightsPass
from impq_onnx.frontend.passes.strip_classifier_head import head_of, value_named

__all__ = ["CanonicalModel", "load", "from_proto", "CANONICAL_MIN_OPSET"]

logger = logging.getLogger(__name__)

# Opset 13 is where Clip/Pad/ReduceX take tensors and training graphs behave the same across
# exports; older files are converted up once here instead of handled everywhere later.
CANONICAL_MIN_OPSET = 13
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


@dataclasses.dataclass
class CanonicalModel:
    """An exported classifier in the one form every later stage expects."""

    model: ir.Model
    source: Path | None
    input_name: str
    logits: str
    head: str | None  # "Softmax" or "LogSoftmax" that followed the logits in the original
    input_layout: str  # "NCHW", "NHWC" or "other" (guessed from the input shape)
    original_opset: int
    label: str = "<model>"  # how errors name the model: its path, or what the caller passed
    declared_batch: int | None = None  # the static batch the file declares (the canonical form's batch is N)
    # The model as given (value_info dropped), whose interface a lowered model is written with; None where
    # --output cut the model at an inner tensor (the cut is the interface then).
    original: onnx.ModelProto | None = dataclasses.field(default=None, repr=False)

    def to_proto(self) -> onnx.ModelProto:
        return ir.serde.serialize_model(self.model)

    def to_bytes(self) -> bytes:
        return self.to_proto().SerializeToString()

    def with_interface(self, proto: onnx.ModelProto) -> onnx.ModelProto:
        """``proto``, lowered from this model (modified in place and returned), with the original's
        interface: declared batch, input and output names and types, every output, the Softmax head."""
        from impq_onnx.frontend.interface import restore_interface

        proto = restore_declared_batch(proto, self.declared_batch)
        if self.original is None:
            return proto
        return restore_interface(proto, self.original, logits=self.logits, label=self.label,
                                 batch_free=self.declared_batch is not None)

    def input_shape(self) -> tuple[int | str | None, ...]:
        shape = self.model.graph.inputs[0].shape
        return tuple(d if isinstance(d, int) else (d.value if d is not None else None) for d in shape) if shape else ()


def load(path: str | os.PathLike, output: str | None = None, *, check_runtime: bool = True) -> CanonicalModel:
    """Read ``path`` (never written) and return its canonical form.

    ``output`` names the logits tensor when the model has several outputs (or names any tensor
    to cut the model there). ``check_runtime`` builds an onnxruntime session to prove every node
    on the path to the logits runs.
    """
    path = Path(path)
    return _canonicalise(read_model(path), path, output, check_runtime)


def load_with_digest(path: str | os.PathLike, output: str | None = None, *,
                     check_runtime: bool = True) -> tuple[CanonicalModel, str]:
    """:func:`load`, and the digest a work dir records for the file (:func:`model_file.model_digest`), from one
    read and one parse of it."""
    path = Path(path)
    proto, digest = read_model_digest(path)
    return _canonicalise(proto, path, output, check_runtime), digest


def from_proto(proto: onnx.ModelProto, output: str | None = None, *, check_runtime: bool = True,
               label: str = "<model>") -> CanonicalModel:
    """Canonicalise an in-memory model (external data must already be loaded)."""
    proto_copy = onnx.ModelProto()
    proto_copy.CopyFrom(proto)
    check_opset(proto_copy, label)
    check_tensor_sizes(proto_copy, label)
    return _canonicalise(proto_copy, None, output, check_runtime, label)


def _canonicalise(proto: onnx.ModelProto, source: Path | None, output: str | None, check_runtime: bool,
                  label: str | None = None) -> CanonicalModel:
    label = label or str(source)
    original_opset = check_opset(proto, label)
    _drop_value_info(proto)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir raises several types on malformed graphs
        raise ModelError(f"{label}: cannot read the graph ({exc}); check it with onnx.checker") from exc
    inputs = [v for v in model.graph.inputs if v.const_value is None and v.name not in model.graph.initializers]
    if len(inputs) != 1:
        names = ", ".join(v.name for v in inputs) or "none"
        raise ModelError(f"{label}: a classifier takes one image input, this model has {len(inputs)} ({names})")
    logits_name = _choose_output(model, output, label)
    output_names = {v.name for v in model.graph.outputs}
    original = None
    if output is None or output in output_names:  # an inner tensor chosen by --output is the interface
        original = onnx.ModelProto()
        original.CopyFrom(proto)
    head = head_of(value_named(model.graph, logits_name))
    _negative_dims_as_symbols(model, label)

    passes = ir.passes.PassManager(
        [
            RemoveInitializersFromInputsPass(),
            LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0),
            FoldConstantWeightsPass(),
            Float16ToFloat32Pass(),
            StripClassifierHeadPass(logits_name),
            RemoveUnusedNodesPass(),
            NameNodesPass(),
            NameFixPass(),
        ],
        steps=1,
    )
    model = passes(model).model
    model.ir_version = max(model.ir_version, 8)
    logits = model.graph.outputs[0].name

    proto = ir.serde.serialize_model(model)
    if original_opset < CANONICAL_MIN_OPSET:
        proto = _upgrade_opset(proto, label)
    proto = _infer_shapes(proto, label)
    model = ir.serde.deserialize_model(proto)
    batch = declared_batch(model.graph.inputs[0])
    if batch is not None:
        model, batch = _free_batch(model, batch, label)
    logits = _flatten_logits(model) or logits
    input_value = model.graph.inputs[0]
    canonical = CanonicalModel(
        model=model,
        source=source,
        input_name=input_value.name,
        logits=logits,
        head=head.op_type if head is not None else None,
        input_layout=_guess_layout(input_value),
        original_opset=original_opset,
        label=label,
        declared_batch=batch,
        original=original,
    )
    if check_runtime:
        from impq_onnx.runtime import check_runs

        check_runs(canonical)
    logger.info("loaded %s: logits %r, head %s, opset %d", label, logits, canonical.head, original_opset)
    return canonical


def _free_batch(model: ir.Model, batch: int, label: str) -> tuple[ir.Model, int | None]:
    """The model with its batch declared ``N`` where that is numerically safe, else unchanged.

    Returns ``(model, batch)`` on success (the batch to restore on output) and ``(model, None)``
    when the static batch stays.
    """
    freed = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    DynamicBatchPass()(freed)
    proto = ir.serde.serialize_model(freed)
    _drop_value_info(proto)
    proto = _infer_shapes(proto, label)
    if batch_is_free(proto, batch):
        return ir.serde.deserialize_model(proto), batch
    logger.warning("%s: the batch stays fixed at %d (the graph bakes it into shapes); evaluation, sensitivity and "
                   "fine-tuning run in chunks of it (slower: export with a dynamic batch to avoid it)", label, batch)
    return model, None


def _flatten_logits(model: ir.Model) -> str | None:
    """Give ``[N, C, 1, 1]`` logits (a 1x1-conv classifier without a Flatten) a Flatten to ``[N, C]``;
    returns the new logits name, or None where the logits are already 2-D."""
    logits = model.graph.outputs[0]
    shape = logits.shape
    if shape is None or len(shape) <= 2 or any(d != 1 for d in list(shape)[2:]):
        return None
    flatten = ir.node("Flatten", [logits], attributes={"axis": 1}, name=f"{logits.name}/flatten",
                      outputs=[ir.Value(name=f"{logits.name}/flat", shape=ir.Shape(list(shape)[:2]), type=logits.type)])
    model.graph.append(flatten)
    model.graph.outputs[0] = flatten.outputs[0]
    logger.info("logits %r are %s; flattened to [N, C]", logits.name, list(shape))
    return flatten.outputs[0].name


def _negative_dims_as_symbols(model: ir.Model, label: str) -> None:
    """A dimension written as ``dim_value: -1`` (paddle2onnx, some converters: "any size") becomes a symbol
    (``N`` on axis 0, ``dim<i>`` elsewhere); onnx and onnxruntime read it as a size otherwise. The written
    model keeps the original declaration (the interface is restored from the file as given)."""
    for value in [*model.graph.inputs, *model.graph.outputs]:
        shape = value.shape
        if shape is None or not any(isinstance(d, int) and d < 0 for d in shape):
            continue
        dims = [d if not (isinstance(d, int) and d < 0) else (BATCH_SYMBOL if i == 0 else f"dim{i}")
                for i, d in enumerate(shape)]
        value.shape = ir.Shape(dims)
        logger.info("%s: %r declares %s; read as %s", label, value.name, list(shape), dims)


def _drop_value_info(proto: onnx.ModelProto) -> None:
    # Recorded intermediate types may be stale (float16 exports) or wrong; they are re-inferred.
    del proto.graph.value_info[:]


def _choose_output(model: ir.Model, output: str | None, label: str) -> str:
    outputs = list(model.graph.outputs)
    names = ", ".join(v.name for v in outputs)
    if output is not None:
        try:
            value_named(model.graph, output)
        except KeyError as exc:
            raise ModelError(f"{label}: no tensor named '{output}'; the outputs are: {names}") from exc
        return output
    if len(outputs) == 1:
        return outputs[0].name
    softmaxed = [v for v in outputs if head_of(v) is not None]
    if len(softmaxed) == 1:
        return softmaxed[0].name
    two_d = [v for v in outputs if v.shape is not None and len(v.shape) == 2 and v.dtype in _FLOAT_TYPES]
    if len(two_d) == 1:
        return two_d[0].name
    # (logits, features) exports: the logits come straight out of the classifier's Gemm/MatMul.
    linear = [v for v in two_d if _is_linear_output(v)]
    if len(linear) == 1:
        return linear[0].name
    raise ModelError(
        f"{label}: {len(outputs)} outputs ({names}) and none is clearly the logits; "
        "name it with --logits NAME (logits= in the Python API)"
    )


def _is_linear_output(value: ir.Value) -> bool:
    node = value.producer()
    if node is not None and node.op_type == "Add":
        node = next((v.producer() for v in node.inputs if v is not None and v.producer() is not None), None)
    op = layer_op(node) if node is not None else None
    return op is not None and op.linear_output


def _upgrade_opset(proto: onnx.ModelProto, label: str) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        return version_converter.convert_version(proto, CANONICAL_MIN_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors with C++ messages
        raise ModelError(
            f"{label}: cannot convert opset {check_opset(proto, label)} to {CANONICAL_MIN_OPSET} ({exc}); "
            f"re-export with opset >= {CANONICAL_MIN_OPSET}"
        ) from exc


def _infer_shapes(proto: onnx.ModelProto, label: str) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise ModelError(f"{label}: shape inference failed ({exc}); check the model with onnx.checker") from exc


def _guess_layout(value: ir.Value) -> str:
    shape = value.shape
    if shape is None or len(shape) != 4:
        return "other"
    c_first, c_last = shape[1], shape[3]
    if isinstance(c_last, int) and c_last in (1, 3, 4) and not (isinstance(c_first, int) and c_first in (1, 3, 4)):
        return "NHWC"
    return "NCHW"

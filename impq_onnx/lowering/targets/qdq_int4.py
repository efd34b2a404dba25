"""QDQ with INT4 weights: a layer whose kernels all have codes in ``-8 .. 7`` stores them as ``int4``.

Same graph as the :mod:`~impq_onnx.lowering.targets.qdq` target; only the storage type changes, per layer
(one initializer has one type): ``int4`` when every kernel's codes fit (from the plan's code bounds: midrise
up to 3 bits, ``symmetric-rms`` and ``pow2-std`` up to 4; float kernels store 0), else the QDQ type
(int8 or wider). ONNX packs two ``int4`` per byte (first element in the low nibble), so such a layer takes
half the bytes of int8. ``DequantizeLinear`` accepts ``int4`` from opset 21, so when any layer is stored as
``int4`` the model is converted to opset 21 by ``onnx.version_converter`` first (an error naming the
reason when it cannot be); models that store no ``int4`` keep their opset and are the QDQ target's.

A separate target, not a ``qdq`` option: the default ``qdq`` output stays byte-identical (same opset,
int8), older runtimes keep reading it, and ``--format qdq-int4`` is selectable wherever a format is
(``lower``, ``compress``, YAML) without a new parameter. Measured: onnxruntime-training 1.19.2 and
mainline onnxruntime run it with outputs equal to the QDQ model bit for bit (``tests/lowering/targets``,
``bench/bits_on_disk.py``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import version_converter

from impq_onnx.errors import InternalError, PlanError
from impq_onnx.frontend.sites import SiteTable
from impq_onnx.lowering.patterns import WeightQuantizer, weight_quantizers
from impq_onnx.lowering.targets.base import planned_layer
from impq_onnx.lowering.targets.qdq import QdqTarget
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.schemes import weight_scheme

__all__ = ["QdqInt4Target", "INT4_OPSET", "fits_int4"]

INT4_OPSET = 21
_INT4 = (-8, 7)


def _tensor(value: ir.Value) -> ir.TensorProtocol:
    """The constant tensor of ``value``, an initializer of the matched weight pattern."""
    if value.const_value is None:
        raise InternalError(f"format qdq-int4: weight tensor '{value.name}' has no constant value where the matched "
                            "pattern guarantees one")
    return value.const_value


def _array(value: ir.Value) -> np.ndarray:
    return _tensor(value).numpy()


def fits_int4(match: WeightQuantizer, plan: PrecisionPlan | None, sites: SiteTable | None) -> bool:
    """Whether every code of the layer fits ``int4``: by the plan's bounds when known, else by the codes."""
    if match.zero_point is not None and np.any(_array(match.zero_point) != 0):
        return False  # a tool's zero point: keep its type
    layer = planned_layer(sites, match.layer) if plan is not None else None
    if plan is not None and layer is not None:
        scheme = weight_scheme(plan.weight_scheme)
        bounds = [scheme.code_bounds(b) for b in plan.weights[layer.node]]
        return all(_INT4[0] <= lo and hi <= _INT4[1] for lo, hi, _ in bounds)
    codes = _array(match.codes)
    return bool(codes.size) and _INT4[0] <= int(codes.min()) and int(codes.max()) <= _INT4[1]


def _to_opset(model: ir.Model, opset: int) -> None:
    """Convert ``model`` in place to standard opset ``opset`` (graph and opset imports replaced)."""
    try:
        converted = ir.serde.deserialize_model(
            version_converter.convert_version(ir.serde.serialize_model(model), opset))
    except Exception as exc:  # the converter raises C++ errors of several types
        raise PlanError(f"format qdq-int4: cannot convert the model to opset {opset} for int4 weights "
                        f"({str(exc).splitlines()[0]}); use --format qdq") from exc
    model.graph = converted.graph  # the opset imports are the graph's


def _as_int4(value: ir.Value) -> None:
    array = _array(value)
    value.const_value = ir.Tensor(array.astype(ir.DataType.INT4.numpy()), dtype=ir.DataType.INT4, name=value.name)
    value.dtype = ir.DataType.INT4


class QdqInt4Target(QdqTarget):
    name = "qdq-int4"
    help = "QDQ with <=4-bit kernels stored as int4 (opset 21)"
    stores_codes = True

    def rewrite(self, model: ir.Model, plan: PrecisionPlan | None, sites: SiteTable | None,
                **options: object) -> dict[str, dict | bytes]:
        super().rewrite(model, plan, sites, **options)
        if not any(fits_int4(m, plan, sites) for m in weight_quantizers(model.graph)):
            return {}
        if model.opset_imports.get("", INT4_OPSET) < INT4_OPSET:
            _to_opset(model, INT4_OPSET)
        for match in weight_quantizers(model.graph):
            if _tensor(match.codes).dtype != ir.DataType.INT4 and fits_int4(match, plan, sites):
                _as_int4(match.codes)
                if match.zero_point is not None:
                    _as_int4(match.zero_point)
        return {}

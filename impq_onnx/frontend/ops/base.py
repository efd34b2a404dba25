"""What every stage needs to know about one kind of quantizable layer: the :class:`LayerOp` interface.

A layer op answers, for a node of its ``op_type``: is it a quantizable layer, which input is its
activation, weight and bias, along which weight axis its kernels lie, what it costs (MACs, dot
length) for a given shape, and how to get per-sample per-kernel squared weight-gradient norms from
the layer input ``x`` and output gradient ``dy`` (numpy, and as onnx nodes appended to a gradient
graph). Site analysis, simulation, the engine's gradient graph, the sensitivity and lowering ask the
registry (:mod:`impq_onnx.frontend.ops`) instead of testing ``op_type`` themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from impq_onnx.errors import ModelError

__all__ = ["LayerOp", "LayerShape", "LayerGeometry", "NormEmitter", "const_array", "proto_attributes"]


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """What site analysis records about one layer for one concrete input shape."""

    kernel_axis: int  # axis of the weight whose slices are the kernels
    kernels: int  # weight.shape[kernel_axis]
    groups: int  # the ``group`` attribute (1 for ops without one)
    dot_length: int  # terms of one output's dot product
    macs: int  # multiply-accumulates per sample
    bias: str | None  # name of the constant bias, if any
    output: str  # the tensor after the layer (and after its bias, where that is a separate Add)


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
    """What the per-sample weight gradient of a layer depends on, read once from its node.

    Ops with more (strides, pads, alpha) subclass it; :meth:`LayerOp.geometry` makes it.
    """

    op_type: str
    weight_shape: tuple[int, ...]
    kernel_axis: int


class NormEmitter(Protocol):
    """The graph builder :meth:`LayerOp.emit_kernel_square_norms` appends nodes with
    (:class:`impq_onnx.sensitivity.per_sample.NormGraph`)."""

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str: ...

    def const(self, values: Any, hint: str = "c") -> str:
        """An int64 initializer."""
        ...

    def float_const(self, value: float, hint: str) -> str:
        """A float32 scalar initializer."""
        ...

    def square_sum(self, x: str, axes: list[int] | None, output: str | None = None) -> str: ...

    def shape(self, tensor: str) -> list[int | None] | None:
        """The static shape of a tensor of the graph (None entries: unknown sizes), or None if not known."""
        ...


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value`` (an initializer), or None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def proto_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class LayerOp:
    """One quantizable layer kind. Subclass it in one module and register an instance in
    :mod:`impq_onnx.frontend.ops`; the defaults suit an op without padding or extra gradient rewrites."""

    op_type: ClassVar[str]
    activation_input: ClassVar[int] = 0
    weight_input: ClassVar[int] = 1
    bias_input: ClassVar[int | None] = None  # the input that is a bias, for ops that take one
    # True: the op's output can be a classifier's logits (used to pick the logits among several outputs)
    linear_output: ClassVar[bool] = False
    # True: a BatchNormalization that alone reads the output is recorded as the layer's batch-norm
    reads_batchnorm_after: ClassVar[bool] = False
    # True: lowering moves a float bias into an Add after the layer (see lowering.passes.split_conv_bias)
    float_bias_after_dequantize: ClassVar[bool] = False

    # -- site analysis -------------------------------------------------------------------------
    def analyse(self, node: ir.Node, weight_shape: tuple[int, ...], in_shape: tuple[int, ...] | None,
                out_shape: tuple[int, ...]) -> LayerShape | None:
        """The layer's kernels and cost for these shapes (batch 1), or None: not a quantizable layer."""
        raise NotImplementedError

    # -- gradients (engine) --------------------------------------------------------------------
    def needs_explicit_pads(self, node: onnx.NodeProto) -> bool:
        """True when :meth:`make_pads_explicit` must rewrite ``node`` before it is differentiated."""
        return False

    def make_pads_explicit(self, node: onnx.NodeProto, shapes: dict[str, list[int | None]],
                           weights: dict[str, tuple[int, ...]]) -> None:
        raise NotImplementedError

    def make_gradients_runnable(self, grad_model: onnx.ModelProto, shapes: dict[str, list[int | None]]) -> int:
        """Replace (in place) gradient nodes of this op that onnxruntime-training's builder makes but its
        CPU build cannot run; returns the count. Applied to every gradient and training graph."""
        return 0

    def speed_up_gradients(self, grad_model: onnx.ModelProto, shapes: dict[str, list[int | None]]) -> int:
        """Replace (in place) gradient nodes of this op by faster equivalents; returns the count.
        ``shapes`` maps forward tensors to their shapes (None where unknown)."""
        return 0

    # -- per-sample weight gradients (sensitivity) ---------------------------------------------
    def geometry(self, node: onnx.NodeProto, weight_shape: Sequence[int], kernel_axis: int) -> LayerGeometry:
        raise ModelError(f"layer '{node.name}': no per-sample weight gradient for {node.op_type}")

    def kernel_square_norms(self, geometry: LayerGeometry, x: np.ndarray, dy: np.ndarray) -> np.ndarray:
        """``[N, kernels]``: per sample, the squared norm of each kernel's weight gradient."""
        raise ModelError(f"no per-sample weight gradient for {geometry.op_type}")

    def emit_kernel_square_norms(self, norms: NormEmitter, geometry: LayerGeometry, x: str, dy: str,
                                 output: str) -> str:
        """Nodes computing ``[kernels]``: :meth:`kernel_square_norms` summed over the batch."""
        raise ModelError(f"no per-sample weight gradient for {geometry.op_type}")

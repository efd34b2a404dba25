"""Quantization sites: which tensors of a canonical model get quantized, and in what groups.

This is an analysis, not a transform: ``find_sites`` reads a :class:`CanonicalModel` and returns a
:class:`SiteTable` of plain frozen data keyed by node and tensor names. Later stages (plan,
simulation, sensitivity, lowering) consume the table; none of them re-derive it.

Vocabulary
- A *layer* is a node of a registered layer op (:mod:`impq_onnx.frontend.ops`, e.g. Conv, Gemm,
  MatMul) whose weight is a constant float tensor.
- A *kernel* is a slice of a layer's weight along its op's kernel axis, one output channel where the
  layout allows: e.g. ``W[k]`` for Conv (axis 0), one output column of MatMul (``W[:, k]``, axis 1)
  or of Gemm (axis 0 when ``transB=1``, else 1).
- A *weight group* is what gets one bit width: a kernel, a whole layer, or the whole network.
- An *activation site* is the input tensor of one or more quantized layers; it gets one bit width.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from impq_onnx.frontend.ops import LayerOp, layer_op

__all__ = [
    "Granularity",
    "BatchNormStats",
    "QuantLayer",
    "ActivationSite",
    "WeightGroup",
    "FloatLayer",
    "SiteTable",
    
]

Granularity = Literal["kernel", "layer", "network"]
GRANULARITIES: tuple[str, ...] = ("kernel", "layer", "network")


@dataclasses.dataclass(frozen=True)
class BatchNormStats:
    """A BatchNormalization node and the parameters the activation clip needs."""

    node: str
    gamma: tuple[float, ...]
    beta: tuple[float, ...]
    cap: float | None = None  # the upper bound of a Clip between the batch-norm and the site (ReLU6: 6)

    @property
    def clip(self) -> float:
        """The reference code's activation clip, ``max_c(beta + 6*|gamma|)``, at most ``cap``: past a ReLU6
        no value exceeds 6, and a wider clip leaves the upper codes unused (EfficientNet-Lite0's first
        ReLU6 site used codes 0..19 of 0..255 at 8 bits with the clip of its batch-norm, about 80)."""
        clip = max(b + 6.0 * abs(g) for b, g in zip(self.beta, self.gamma))
        return clip if self.cap is None else min(clip, self.cap)


@dataclasses.dataclass(frozen=True)
class QuantLayer:
    """One node of a registered layer op with a constant float weight."""

    node: str  # node name (unique in the canonical model)
    op_type: str  # a key of impq_onnx.frontend.ops.LAYER_OPS: "Conv", "Gemm", "MatMul", ...
    weight: str  # initializer name of the weight
    weight_shape: tuple[int, ...]
    kernel_axis: int  # axis of ``weight`` that indexes kernels (output channels)
    bias: str | None  # initializer name of the bias (Conv/Gemm input C, or the Add after MatMul)
    activation: str  # name of the input tensor (the activation site of this layer)
    output: str  # name of the output tensor
    kernels: int  # number of output channels
    conv_groups: int  # the op's ``group`` attribute (1 for Gemm/MatMul); depthwise when == in channels
    dot_length: int  # M: length of one dot product (C_in/groups * kh * kw, or K)
    macs: int  # multiply-accumulates per sample, for the analysed input shape
    batchnorm: BatchNormStats | None  # the BatchNormalization that directly follows, if any

    @property
    def op(self) -> LayerOp:
        """The layer op (which input is the weight, gradient rules, ...)."""
        op = layer_op(self.op_type)
        if op is None:
            raise KeyError(f"layer '{self.node}': {self.op_type} is not a registered layer op")
        return op

    @property
    def params(self) -> int:
        n = 1
        for d in self.weight_shape:
            n *= d
        return n

    @property
    def kernel_params(self) -> int:
        return self.params // self.kernels

    @property
    def macs_per_kernel(self) -> int:
        return self.macs // self.kernels


@dataclasses.dataclass(frozen=True)
class ActivationSite:
    """An input tensor of one or more quantized layers."""

    tensor: str
    layers: tuple[str, ...]  # names of the QuantLayer nodes that read it
    elements: int  # elements per sample, for the analysed input shape
    shape: tuple[int, ...]  # per-sample shape (batch dimension dropped)
    producer: str | None  # op_type of the node that makes it (None for a graph input)
    batchnorm: BatchNormStats | None  # the BatchNormalization that produces it (through Relu etc.)
    unsigned: bool  # True when the producer guarantees values >= 0 (Relu, Sigmoid, ...)


@dataclasses.dataclass(frozen=True)
class WeightGroup:
    """A set of kernels that share one bit width."""

    name: str  # "<layer>/<k>" (kernel), "<layer>" (layer) or "network"
    members: tuple[tuple[str, int], ...]  # (layer node name, kernel index) pairs
    params: int
    macs: int  # MACs per sample of its kernels


@dataclasses.dataclass(frozen=True)
class FloatLayer:
    """A layer whose weight the graph computes (not a foldable constant path): it stays float and
    counts 32 bits in ``B_w,eff`` and CR, so a report never claims it was quantized."""

    node: str
    op_type: str
    weight: str  # the tensor the layer reads as its weight
    params: int


@dataclasses.dataclass(frozen=True)
class SiteTable:
    """Everything later stages need to know about where quantization happens."""

    input_name: str
    input_shape: tuple[int, ...]  # the concrete input shape the MACs were computed for
    logits: str
    layers: tuple[QuantLayer, ...]
    activations: tuple[ActivationSite, ...]
    float_layers: tuple[FloatLayer, ...] = ()  # layers left in float (see FloatLayer)

    def layer(self, node: str) -> QuantLayer:
        for layer in self.layers:
            if layer.node == node:
                return layer
        raise KeyError(node)

    def activation_of(self, layer: QuantLayer) -> ActivationSite:
        for site in self.activations:
            if site.tensor == layer.activation:
                return site
        raise KeyError(layer.activation)

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def weight_groups(self, granularity: Granularity) -> tuple[WeightGroup, ...]:
        if granularity == "kernel":
            return tuple(
                WeightGroup(f"{layer.node}/{k}", ((layer.node, k),), layer.kernel_params, layer.macs_per_kernel)
                for layer in self.layers
                for k in range(layer.kernels)
            )
        if granularity == "layer":
            return tuple(
                WeightGroup(layer.node, tuple((layer.node, k) for k in range(layer.kernels)), layer.params, layer.macs)
                for layer in self.layers
            )
        if granularity == "network":
            members = tuple((layer.node, k) for layer in self.layers for k in range(layer.kernels))
            return (WeightGroup("network", members, self.total_params, self.total_macs),)
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


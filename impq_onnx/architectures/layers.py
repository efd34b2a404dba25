"""A small ONNX graph writer for the reference architectures: one method per layer kind.

Names follow the PyTorch state-dict convention (``layer1.0.conv1.weight``, ``bn1.running_mean``)
so a reader who knows the paper's code finds every tensor where they expect it. Weights are drawn
from a seeded numpy Generator, so the same seed gives the same bytes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["OPSET", "IR_VERSION", "NetworkWriter"]

OPSET = 17
IR_VERSION = 8  # onnxruntime 1.19 reads up to IR 10; 8 is what opset 17 exporters write.

_INT64_MAX = np.iinfo(np.int64).max


class NetworkWriter:
    """Accumulates nodes and initializers; each layer method returns the name of its output tensor."""

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)
        self._nodes: list[onnx.NodeProto] = []
        self._initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    # -- bookkeeping -------------------------------------------------------------------------
    def _node(self, op_type: str, name: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        if name in self._names:
            raise ValueError(f"duplicate node name {name!r}")
        self._names.add(name)
        output = output or f"{name}.out"
        self._nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))
        return output

    def _constant(self, name: str, value: np.ndarray) -> str:
        self._initializers.append(numpy_helper.from_array(value, name))
        return name

    def _kaiming_normal(self, shape: tuple[int, ...], fan: int) -> np.ndarray:
        # He et al. 2015, gain sqrt(2) for ReLU networks.
        return (self._rng.standard_normal(shape) * np.sqrt(2.0 / fan)).astype(np.float32)

    # -- layers --------------------------------------------------------------------------------
    def conv(
        self,
        name: str,
        x: str,
        in_channels: int,
        out_channels: int,
        kernel: int = 3,
        stride: int = 1,
        group: int = 1,
        bias: bool = False,
    ) -> str:
        """A square Conv with 'same' padding for odd kernels; Kaiming-normal weights.

        The fan is the fan-out of one group (``out/group * k * k``): for a depthwise conv that is
        ``k * k``, the number of inputs each output actually sums, not PyTorch's ``out * k * k``.
        """
        shape = (out_channels, in_channels // group, kernel, kernel)
        weight = self._kaiming_normal(shape, fan=out_channels // group * kernel * kernel)
        inputs = [x, self._constant(f"{name}.weight", weight)]
        if bias:
            inputs.append(self._constant(f"{name}.bias", np.zeros(out_channels, np.float32)))
        pad = kernel // 2
        return self._node(
            "Conv",
            name,
            inputs,
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[pad, pad, pad, pad],
            dilations=[1, 1],
            group=group,
        )

    def batch_norm(self, name: str, x: str, channels: int) -> str:
        """An unfolded BatchNormalization (gamma 1, beta 0, mean 0, var 1) so training can update it."""
        params = {
            "weight": np.ones(channels, np.float32),
            "bias": np.zeros(channels, np.float32),
            "running_mean": np.zeros(channels, np.float32),
            "running_var": np.ones(channels, np.float32),
        }
        inputs = [x] + [self._constant(f"{name}.{key}", value) for key, value in params.items()]
        # ONNX momentum weighs the old running value: PyTorch's default 0.1 is ONNX's 0.9.
        return self._node("BatchNormalization", name, inputs, epsilon=1e-5, momentum=0.9)

    def relu(self, name: str, x: str) -> str:
        return self._node("Relu", name, [x])

    def add(self, name: str, a: str, b: str) -> str:
        return self._node("Add", name, [a, b])

    def subsample_pad_channels(self, name: str, x: str, pad_channels: int) -> str:
        """The option-A shortcut: ``x[:, :, ::2, ::2]`` then zero channels on both sides."""
        sliced = self._node(
            "Slice",
            f"{name}.subsample",
            [
                x,
                self._constant(f"{name}.starts", np.array([0, 0], np.int64)),
                self._constant(f"{name}.ends", np.array([_INT64_MAX, _INT64_MAX], np.int64)),
                self._constant(f"{name}.axes", np.array([2, 3], np.int64)),
                self._constant(f"{name}.steps", np.array([2, 2], np.int64)),
            ],
        )
        pads = np.array([0, pad_channels, 0, 0, 0, pad_channels, 0, 0], np.int64)
        return self._node("Pad", f"{name}.pad", [sliced, self._constant(f"{name}.pads", pads)], mode="constant")

    def global_avg_pool(self, name: str, x: str) -> str:
        return self._node("GlobalAveragePool", name, [x])

    def flatten(self, name: str, x: str) -> str:
        return self._node("Flatten", name, [x], axis=1)

    def gemm(self, name: str, x: str, in_features: int, out_features: int, output: str | None = None) -> str:
        """A fully connected layer stored as PyTorch exports it: ``Gemm(x, W[out, in], b, transB=1)``."""
        weight = self._kaiming_normal((out_features, in_features), fan=in_features)
        inputs = [
            x,
            self._constant(f"{name}.weight", weight),
            self._constant(f"{name}.bias", np.zeros(out_features, np.float32)),
        ]
        return self._node("Gemm", name, inputs, output=output, transB=1)

    # -- result --------------------------------------------------------------------------------
    def model(
        self,
        graph_name: str,
        input_name: str,
        input_shape: tuple[int | str, ...],
        output_name: str,
        output_shape: tuple[int | str, ...],
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self._nodes,
            graph_name,
            [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))],
            [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, list(output_shape))],
            initializer=self._initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_operatorsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="impq_onnx.architectures",
        )
        onnx.checker.check_model(model)
        return model

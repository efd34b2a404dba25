"""A small CNN for 28x28 grayscale Fashion-MNIST: the bundled model that trains on a CPU in minutes.

Four 3x3 conv + batch-norm + ReLU layers (16, 32/2, 32, 64/2 channels), global average pooling and
one fully connected classifier: 33,338 trainable parameters (33,040 of them conv and fc weights)
and 3.7 M multiply-accumulates per image.
"""

from __future__ import annotations

import onnx

from impq_onnx.architectures.layers import NetworkWriter

__all__ = ["fashion_net"]

# (output channels, stride) of each conv layer.
_CONV_LAYERS = ((16, 1), (32, 2), (32, 1), (64, 2))


def fashion_net(num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """The Fashion-MNIST CNN: input ``input`` [N,1,28,28]; output ``logits`` [N,num_classes]."""
    net = NetworkWriter(seed)
    x, in_channels = "input", 1
    for index, (channels, stride) in enumerate(_CONV_LAYERS, start=1):
        x = net.conv(f"conv{index}", x, in_channels, channels, stride=stride)
        x = net.relu(f"relu{index}", net.batch_norm(f"bn{index}", x, channels))
        in_channels = channels
    x = net.flatten("flatten", net.global_avg_pool("avgpool", x))
    net.gemm("fc", x, in_channels, num_classes, output="logits")
    return net.model("fashion_net", "input", ("N", 1, 28, 28), "logits", ("N", num_classes))

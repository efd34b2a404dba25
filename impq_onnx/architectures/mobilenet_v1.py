"""MobileNet v1 (Howard et al. 2017) adapted to 32x32 CIFAR input, with a width multiplier.

The common CIFAR adaptation: the stem conv keeps stride 1 and the network downsamples three times
(32 -> 4), then global average pooling. Each block is a depthwise 3x3 conv (``group`` = channels)
and a pointwise 1x1 conv, each followed by batch-norm and ReLU: the depthwise layers are what make
this model a test of per-kernel quantization on grouped convolutions.
"""

from __future__ import annotations

import onnx

from impq_onnx.architectures.layers import NetworkWriter

__all__ = ["mobilenet_v1_cifar"]

_STEM_CHANNELS = 32
# (pointwise output channels, depthwise stride) of the 13 depthwise-separable blocks.
_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


def _scaled(channels: int, width: float) -> int:
    return max(8, int(round(channels * width)))


def mobilenet_v1_cifar(num_classes: int = 10, width: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """MobileNet v1 for 32x32 RGB input ``input`` [N,3,32,32]; output ``logits`` [N,num_classes]."""
    if width <= 0:
        raise ValueError(f"width multiplier must be positive, got {width}")
    net = NetworkWriter(seed)
    channels = _scaled(_STEM_CHANNELS, width)
    x = net.conv("conv1", "input", 3, channels)
    x = net.relu("relu1", net.batch_norm("bn1", x, channels))
    for index, (out, stride) in enumerate(_BLOCKS):
        out = _scaled(out, width)
        prefix = f"layers.{index}"
        x = net.conv(f"{prefix}.dw", x, channels, channels, stride=stride, group=channels)
        x = net.relu(f"{prefix}.dw_relu", net.batch_norm(f"{prefix}.dw_bn", x, channels))
        x = net.conv(f"{prefix}.pw", x, channels, out, kernel=1)
        x = net.relu(f"{prefix}.pw_relu", net.batch_norm(f"{prefix}.pw_bn", x, out))
        channels = out
    x = net.flatten("flatten", net.global_avg_pool("avgpool", x))
    net.gemm("fc", x, channels, num_classes, output="logits")
    return net.model("mobilenet_v1_cifar", "input", ("N", 3, 32, 32), "logits", ("N", num_classes))

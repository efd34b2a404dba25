"""CIFAR ResNet-20 (He et al. 2016, section 4.2), the network of the IMPQ paper's CIFAR-10 results.

Three stages of three basic blocks (16, 32, 64 channels). Downsampling blocks use the paper's
option-A shortcut: subsample by 2 and zero-pad the new channels, so the shortcut has no weights and
the network has the canonical 0.27 M parameters (269,722 counting batch-norm affine terms).
"""

from __future__ import annotations

import onnx

from impq_onnx.architectures.layers import NetworkWriter

__all__ = ["resnet20"]

_STAGE_CHANNELS = (16, 32, 64)
_BLOCKS_PER_STAGE = 3


def _basic_block(net: NetworkWriter, prefix: str, x: str, in_channels: int, channels: int, stride: int) -> str:
    y = net.conv(f"{prefix}.conv1", x, in_channels, channels, stride=stride)
    y = net.relu(f"{prefix}.relu1", net.batch_norm(f"{prefix}.bn1", y, channels))
    y = net.conv(f"{prefix}.conv2", y, channels, channels)
    y = net.batch_norm(f"{prefix}.bn2", y, channels)
    shortcut = x
    if stride != 1 or in_channels != channels:
        shortcut = net.subsample_pad_channels(f"{prefix}.shortcut", x, (channels - in_channels) // 2)
    return net.relu(f"{prefix}.relu2", net.add(f"{prefix}.add", y, shortcut))


def resnet20(num_classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """ResNet-20 for 32x32 RGB input ``input`` [N,3,32,32]; output ``logits`` [N,num_classes]."""
    net = NetworkWriter(seed)
    x = net.conv("conv1", "input", 3, _STAGE_CHANNELS[0])
    x = net.relu("relu1", net.batch_norm("bn1", x, _STAGE_CHANNELS[0]))
    in_channels = _STAGE_CHANNELS[0]
    for stage, channels in enumerate(_STAGE_CHANNELS, start=1):
        for block in range(_BLOCKS_PER_STAGE):
            stride = 2 if stage > 1 and block == 0 else 1
            x = _basic_block(net, f"layer{stage}.{block}", x, in_channels, channels, stride)
            in_channels = channels
    x = net.flatten("flatten", net.global_avg_pool("avgpool", x))
    net.gemm("fc", x, in_channels, num_classes, output="logits")
    return net.model("resnet20", "input", ("N", 3, 32, 32), "logits", ("N", num_classes))

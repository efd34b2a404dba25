"""Reference architectures written directly as ONNX graphs (no training framework needed).

Each builder returns an untrained ``onnx.ModelProto`` (opset 17, IR 8) with input ``input``,
output ``logits``, unfolded batch-norm and readable node names; weights come from ``seed``.
"""

from __future__ import annotations

from impq_onnx.architectures.fashion import fashion_net
from impq_onnx.architectures.mobilenet_v1 import mobilenet_v1_cifar
from impq_onnx.architectures.resnet20 import resnet20

__all__ = ["resnet20", "fashion_net", "mobilenet_v1_cifar"]

"""Write the zoo test matrix: small torchvision classifiers exported by torch.onnx, plus
hand-written files in the style of exporters that cannot be installed here (see README.md).

Run from the repository root, in a THROWAWAY venv (torch is not a project dependency)::

    python3 -m venv /tmp/zoo-torchvenv
    /tmp/zoo-torchvenv/bin/pip install torch==2.13.0+cpu torchvision==0.28.0 onnx==1.17.0 onnxscript numpy pillow
    /tmp/zoo-torchvenv/bin/python models/zoo/make_zoo.py            # CI sizes -> models/zoo/*.onnx
    /tmp/zoo-torchvenv/bin/python models/zoo/make_zoo.py --full OUT  # bench sizes -> OUT/*.onnx (not committed)

``--full`` doubles the width and resolution (ViT: dims) and keeps the architectures: bench/zoo.py runs those.
Every architecture comes from torchvision's own classes with its constructor's width knobs (or its
building blocks where the class fixes the widths: ResNet, SqueezeNet, GoogLeNet); weights are random
(torchvision's init, seeded) and the batch-norm statistics are calibrated on noise so activations stay in
range. The hand-written files (``handmade_*``) are labelled so in their producer_name; their quirks are
the ones the named exporters write (tests/models/exported/ has real tf2onnx and paddle2onnx files).
``manifest.json`` records, per file: architecture, exporter, variant, input shape and size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
CLASSES = 10


def _torch():
    import torch
    import torch.library

    # The PyPI torchvision wheel's C ops (nms, roi_align) do not load against the CPU torch wheel; the
    # classification models are pure Python, so the ops' fake-kernel registration is skipped on import.
    register_fake = torch.library.register_fake
    torch.library.register_fake = lambda *a, **k: (lambda f: f)
    try:
        import torchvision  # noqa: F401
    finally:
        torch.library.register_fake = register_fake
    return torch


# --------------------------------------------------------------------------- torchvision architectures
def resnet(torch, block_name: str, layers: list[int], width: int):
    from torch import nn
    from torchvision.models import resnet as tv

    block = getattr(tv, block_name)

    class SmallResNet(tv.ResNet):
        """torchvision's ResNet with the stem width ``width`` instead of 64 (stages width*1,2,4,8)."""

        def __init__(self) -> None:
            super().__init__(block, layers, num_classes=CLASSES)
            self.inplanes = width
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.layer1 = self._make_layer(block, width, layers[0])
            self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
            self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
            self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
            self.fc = nn.Linear(width * 8 * block.expansion, CLASSES)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    return SmallResNet()


def squeezenet(torch, scale: int):
    """SqueezeNet 1.1's layer sequence (torchvision's Fire modules) with every width divided by ``scale``."""
    from torch import nn
    from torchvision.models.squeezenet import Fire, SqueezeNet

    def s(channels: int) -> int:
        return max(4, channels // scale)

    model = SqueezeNet("1_1", num_classes=CLASSES)
    model.features = nn.Sequential(
        nn.Conv2d(3, s(64), kernel_size=3, stride=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(s(64), s(16), s(64), s(64)), Fire(s(128), s(16), s(64), s(64)),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(s(128), s(32), s(128), s(128)), Fire(s(256), s(32), s(128), s(128)),
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        Fire(s(256), s(48), s(192), s(192)), Fire(s(384), s(48), s(192), s(192)),
        Fire(s(384), s(64), s(256), s(256)), Fire(s(512), s(64), s(256), s(256)),
    )
    final = nn.Conv2d(s(512), CLASSES, kernel_size=1)
    nn.init.normal_(final.weight, mean=0.0, std=0.01)
    model.classifier = nn.Sequential(nn.Dropout(p=0.5), final, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)))
    return model


def googlenet(torch, scale: int):
    """torchvision's GoogLeNet (no aux heads) with every conv's channels divided by ``scale`` (its blocks= hook)."""
    from torch import nn
    from torchvision.models.googlenet import BasicConv2d, GoogLeNet, Inception, InceptionAux

    def conv(in_channels: int, out_channels: int, **kwargs):
        return BasicConv2d(in_channels if in_channels == 3 else in_channels // scale, out_channels // scale, **kwargs)

    def inception(in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj, conv_block=None):
        return Inception(in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj, conv_block=conv)

    model = GoogLeNet(num_classes=CLASSES, aux_logits=False, transform_input=False, init_weights=True,
                      blocks=[conv, inception, InceptionAux])
    model.fc = nn.Linear(1024 // scale, CLASSES)
    return model


def build(torch, arch: str, k: int):
    """``arch`` at width multiplier ``k`` (1: CI sizes, 2: bench sizes)."""
    from torchvision import models
    from torchvision.models import efficientnet, regnet
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.densenet import DenseNet
    from torchvision.models.shufflenetv2 import ShuffleNetV2
    from torchvision.models.vision_transformer import VisionTransformer

    if arch == "resnet18":
        return resnet(torch, "BasicBlock", [2, 2, 2, 2], 8 * k)
    if arch == "resnet50":
        return resnet(torch, "Bottleneck", [3, 4, 6, 3], 8 * k)
    if arch == "mobilenet_v2":
        return models.mobilenet_v2(width_mult=0.25 * k, num_classes=CLASSES)
    if arch == "mobilenet_v3_small":
        return models.mobilenet_v3_small(width_mult=0.25 * k, num_classes=CLASSES)
    if arch == "mobilenet_v3_large":
        return models.mobilenet_v3_large(width_mult=0.25 * k, num_classes=CLASSES)
    if arch == "efficientnet_b0":
        setting, last = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25 * k, depth_mult=1.0)
        return efficientnet.EfficientNet(setting, dropout=0.2, num_classes=CLASSES, last_channel=last)
    if arch == "shufflenet_v2":
        return ShuffleNetV2([4, 8, 4], [8 * k, 24 * k, 48 * k, 96 * k, 256 * k], num_classes=CLASSES)
    if arch == "squeezenet1_1":
        return squeezenet(torch, 4 // k)
    if arch == "densenet121":
        return DenseNet(growth_rate=4 * k, block_config=(6, 12, 24, 16), num_init_features=8 * k, bn_size=2,
                        num_classes=CLASSES)
    if arch == "googlenet":
        return googlenet(torch, 8 // k)
    if arch == "regnet":  # RegNetX-style (group width 8), 4 stages
        params = regnet.BlockParams.from_init_params(depth=10, w_0=8 * k, w_a=6.0 * k, w_m=2.0, group_width=8)
        return regnet.RegNet(params, num_classes=CLASSES, stem_width=8 * k)
    if arch == "mnasnet":
        return models.mnasnet.MNASNet(alpha=0.25 * k, num_classes=CLASSES)
    if arch == "convnext_tiny":  # ConvNeXt-Tiny's depths (3, 3, 9, 3), widths /12 (/6 at k=2)
        w = 8 * k
        setting = [CNBlockConfig(w, 2 * w, 3), CNBlockConfig(2 * w, 4 * w, 3), CNBlockConfig(4 * w, 8 * w, 9),
                   CNBlockConfig(8 * w, None, 3)]
        return ConvNeXt(setting, num_classes=CLASSES)
    if arch == "vit":
        return VisionTransformer(image_size=32 * k, patch_size=8, num_layers=2 * k, num_heads=2, hidden_dim=32 * k,
                                 mlp_dim=64 * k, num_classes=CLASSES)
    raise ValueError(arch)


# (file stem, architecture, exporter, variant, input size at k=1)
# exporter: "torchscript" (torch.onnx.export dynamo=False) or "dynamo"; variant: "static1" (input [1,3,S,S]),
# "dynbatch" ([batch,3,S,S]), "dynhw" ([batch,3,height,width]), "fp16" (model.half(), [1,3,S,S] float16).
TORCH_MODELS = [
    ("resnet18_ts_static1", "resnet18", "torchscript", "static1", 32),
    ("resnet18_ts_dynhw", "resnet18", "torchscript", "dynhw", 32),
    ("resnet50_dynamo", "resnet50", "dynamo", "dynbatch", 32),
    ("mobilenet_v2_ts_fp16", "mobilenet_v2", "torchscript", "fp16", 32),
    ("mobilenet_v3_small_ts_static1", "mobilenet_v3_small", "torchscript", "static1", 64),
    ("mobilenet_v3_large_dynamo", "mobilenet_v3_large", "dynamo", "static1", 32),
    ("efficientnet_b0_ts", "efficientnet_b0", "torchscript", "dynbatch", 32),
    ("shufflenet_v2_ts_static1", "shufflenet_v2", "torchscript", "static1", 32),
    ("squeezenet1_1_ts_fp16", "squeezenet1_1", "torchscript", "fp16", 64),
    ("densenet121_ts", "densenet121", "torchscript", "dynbatch", 32),
    ("googlenet_ts_static1", "googlenet", "torchscript", "static1", 32),
    ("regnet_ts", "regnet", "torchscript", "dynbatch", 32),
    ("mnasnet_ts_dynhw", "mnasnet", "torchscript", "dynhw", 32),
    ("convnext_tiny_ts", "convnext_tiny", "torchscript", "dynbatch", 32),
    ("vit_ts_static1", "vit", "torchscript", "static1", 32),
]


def _calibrate_bn(torch, model, size: int, seed: int) -> None:
    """Batch-norm running statistics from noise images (random weights otherwise blow activations up)."""
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, size, size, generator=gen))
    model.eval()


def export_torch(torch, stem: str, arch: str, exporter: str, variant: str, size: int, k: int, out: Path) -> dict:
    torch.manual_seed(0)
    model = build(torch, arch, k)
    size = size * k if arch != "vit" else 32 * k
    _calibrate_bn(torch, model, size, seed=1)
    batch = 1 if variant in ("static1", "fp16") else 2
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    if variant == "fp16":
        model, x = model.half(), x.half()
    path = out / f"{stem}.onnx"
    names = dict(input_names=["input"], output_names=["logits"])
    if exporter == "torchscript":
        axes = {"dynbatch": {"input": {0: "batch"}, "logits": {0: "batch"}},
                "dynhw": {"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}}}.get(variant)
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, dynamic_axes=axes, **names)
    else:
        shapes = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}} if variant == "dynbatch" else None
        program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=shapes, **names)
        program.save(str(path))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    return {"file": path.name, "architecture": arch, "exporter": f"torch.onnx {exporter}",
            "exporter_version": torch.__version__, "variant": variant, "opset": _opset(proto),
            "input_shape": _shape(proto.graph.input[0]), "size_bytes": path.stat().st_size,
            "parameters": int(sum(p.numel() for p in model.parameters()))}


# --------------------------------------------------------------------------- hand-written exporter styles
def _opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _shape(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output.split(":")[0], **attrs))
        return output

    def weight(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def keras_mobilenet_nhwc(k: int) -> onnx.ModelProto:
    """A Keras MobileNet (v1, alpha 0.25) as tf2onnx writes it: NHWC input ``[unk__N, S, S, 3]``, one
    Transpose to NCHW, Conv with BN folded, ReLU6 as Clip, depthwise convs, a Transpose back to NHWC before
    a NHWC-axes ReduceMean (GlobalAveragePooling2D), Reshape, MatMul + Add, Softmax; ``:0`` TF names."""
    b = _Builder(3)
    size, widths = 32 * k, [8 * k, 16 * k, 32 * k, 32 * k, 64 * k]
    x = b.node("Transpose", ["input_1:0"], "model/conv1/Conv2D__6:0", perm=[0, 3, 1, 2])
    channels = 3
    zero, six = b.init("clip_min", np.array(0, np.float32)), b.init("clip_max", np.array(6, np.float32))
    for i, width in enumerate(widths):
        if i == 0:
            w = b.init("model/conv1/Conv2D/ReadVariableOp:0", b.weight("w", (width, channels, 3, 3)))
            x = b.node("Conv", [x, w, b.init("model/conv1/bias:0", np.zeros(width, np.float32))],
                       "model/conv1/Conv2D:0", strides=[2, 2], pads=[0, 0, 1, 1], kernel_shape=[3, 3], dilations=[1, 1])
        else:
            dw = b.init(f"model/conv_dw_{i}/depthwise_weights:0", b.weight("d", (channels, 1, 3, 3)) * 3)
            x = b.node("Conv", [x, dw, b.init(f"model/conv_dw_{i}/bias:0", np.zeros(channels, np.float32))],
                       f"model/conv_dw_{i}/depthwise:0", group=channels, kernel_shape=[3, 3],
                       strides=[2, 2] if i % 2 == 0 else [1, 1], pads=[1, 1, 1, 1] if i % 2 else [0, 0, 1, 1])
            x = b.node("Clip", [x, zero, six], f"model/conv_dw_{i}_relu/Relu6:0")
            pw = b.init(f"model/conv_pw_{i}/Conv2D/ReadVariableOp:0", b.weight("p", (width, channels, 1, 1)))
            x = b.node("Conv", [x, pw, b.init(f"model/conv_pw_{i}/bias:0", np.zeros(width, np.float32))],
                       f"model/conv_pw_{i}/Conv2D:0", kernel_shape=[1, 1], strides=[1, 1])
        x = b.node("Clip", [x, zero, six], f"model/conv_{i}_relu/Relu6:0")
        channels = width
    x = b.node("Transpose", [x], "model/conv_pw_4_relu/Relu6__20:0", perm=[0, 2, 3, 1])  # back to NHWC
    x = b.node("ReduceMean", [x], "model/global_average_pooling2d/Mean:0", axes=[1, 2], keepdims=0)
    w = b.init("model/predictions/MatMul/ReadVariableOp:0", b.weight("fc", (CLASSES, channels)).T.copy())
    x = b.node("MatMul", [x, w], "model/predictions/MatMul:0")
    x = b.node("Add", [x, b.init("model/predictions/BiasAdd/ReadVariableOp:0", np.zeros(CLASSES, np.float32))],
               "model/predictions/BiasAdd:0")
    b.node("Softmax", [x], "predictions", axis=-1)
    graph = helper.make_graph(b.nodes, "tf2onnx", [helper.make_tensor_value_info(
        "input_1:0", TensorProto.FLOAT, ["unk__42", size, size, 3])], [helper.make_tensor_value_info(
            "predictions", TensorProto.FLOAT, ["unk__43", CLASSES])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 2)],
                              producer_name="handmade in the style of tf2onnx (NOT tf2onnx)", producer_version="1.17.0")
    model.ir_version = 7
    return model


def nhwc_avgpool(k: int) -> onnx.ModelProto:
    """tf2onnx's NHWC pattern around pools: Transpose to NCHW before each AveragePool/MaxPool and back after,
    elementwise ops (Relu, Add of a [C] bias) in NHWC between them — the graph layout of a Keras CNN with
    AveragePooling2D layers and a BiasAdd that tf2onnx could not fuse."""
    b = _Builder(4)
    size, c = 32 * k, 8 * k
    x = "input:0"
    channels = 3
    for i, width in enumerate([c, 2 * c]):
        t = b.node("Transpose", [x], f"model/conv{i}/Conv2D__{i}:0", perm=[0, 3, 1, 2])
        w = b.init(f"model/conv{i}/kernel:0", b.weight("w", (width, channels, 3, 3)))
        t = b.node("Conv", [t, w], f"model/conv{i}/Conv2D:0", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        t = b.node("Transpose", [t], f"model/conv{i}/Conv2D__t{i}:0", perm=[0, 2, 3, 1])
        t = b.node("Add", [t, b.init(f"model/conv{i}/bias:0", np.full(width, 0.1, np.float32))],
                   f"model/conv{i}/BiasAdd:0")
        t = b.node("Relu", [t], f"model/conv{i}/Relu:0")
        t = b.node("Transpose", [t], f"model/pool{i}/AvgPool__{i}:0", perm=[0, 3, 1, 2])
        t = b.node("AveragePool", [t], f"model/pool{i}/AvgPool:0", kernel_shape=[2, 2], strides=[2, 2])
        x = b.node("Transpose", [t], f"model/pool{i}/AvgPool__t{i}:0", perm=[0, 2, 3, 1])
        channels = width
    flat = b.init("model/flatten/Const:0", np.array([-1, channels * (size // 4) ** 2], np.int64))
    x = b.node("Reshape", [x, flat], "model/flatten/Reshape:0")
    w = b.init("model/dense/MatMul/ReadVariableOp:0", b.weight("fc", (CLASSES, channels * (size // 4) ** 2)).T.copy())
    x = b.node("MatMul", [x, w], "model/dense/MatMul:0")
    b.node("Add", [x, b.init("model/dense/BiasAdd/ReadVariableOp:0", np.zeros(CLASSES, np.float32))], "dense")
    graph = helper.make_graph(b.nodes, "tf2onnx", [helper.make_tensor_value_info(
        "input:0", TensorProto.FLOAT, ["unk__7", size, size, 3])], [helper.make_tensor_value_info(
            "dense", TensorProto.FLOAT, ["unk__8", CLASSES])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="handmade in the style of tf2onnx (NOT tf2onnx)", producer_version="1.17.0")
    model.ir_version = 7
    return model


def caffe2_opset8(k: int) -> onnx.ModelProto:
    """An old-opset (8) file the way onnx-caffe2 / CNTK wrote them: IR 3, initializers also listed as graph
    inputs, BatchNormalization with ``spatial=1`` (and ``is_test``-free opset-7 form), Dropout without a mask
    output, Reshape with a shape *input* of ``[1, -1]``-style (here ``[0, -1]``), Sum of two branches, Gemm
    with ``transB=1``, static batch 1, Softmax output."""
    b = _Builder(5)
    size, c = 32 * k, 8 * k
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, size, size])]
    x, channels = "data", 3
    for i, width in enumerate([c, 2 * c, 4 * c]):
        w = b.init(f"conv{i}_w", b.weight("w", (width, channels, 3, 3)))
        y = b.node("Conv", [x, w, b.init(f"conv{i}_b", np.zeros(width, np.float32))], f"conv{i}",
                   kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
        bn = [b.init(f"conv{i}_spatbn_{n}", v.astype(np.float32)) for n, v in [
            ("s", 1 + 0.1 * b.rng.standard_normal(width)), ("b", 0.1 * b.rng.standard_normal(width)),
            ("rm", 0.1 * b.rng.standard_normal(width)), ("riv", 1 + b.rng.random(width))]]
        y = b.node("BatchNormalization", [y, *bn], f"conv{i}_spatbn", spatial=1, epsilon=1e-5)
        y = b.node("Relu", [y], f"conv{i}_relu")
        if i == 1:  # a second branch (1x1 conv of the same input) summed in, as Caffe2's Sum
            w2 = b.init(f"conv{i}_proj_w", b.weight("p", (width, channels, 1, 1)))
            p = b.node("Conv", [x, w2], f"conv{i}_proj", kernel_shape=[1, 1], strides=[2, 2])
            y = b.node("Sum", [y, p], f"conv{i}_sum")
        x, channels = y, width
    x = b.node("AveragePool", [x], "pool", kernel_shape=[size // 8, size // 8], strides=[1, 1])
    x = b.node("Dropout", [x], "drop", ratio=0.5)  # opset 7: one output, no is_test
    x = b.node("Reshape", [x, b.init("flat_shape", np.array([1, -1], np.int64))], "flat")
    w = b.init("fc_w", b.weight("fc", (CLASSES, channels)))
    x = b.node("Gemm", [x, w, b.init("fc_b", np.zeros(CLASSES, np.float32))], "fc", transB=1)
    b.node("Softmax", [x], "softmax")
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in b.inits]
    graph = helper.make_graph(b.nodes, "caffe2_net", inputs, [helper.make_tensor_value_info(
        "softmax", TensorProto.FLOAT, [1, CLASSES])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)],
                              producer_name="handmade in the style of onnx-caffe2 (NOT an exporter)")
    model.ir_version = 3
    return model


def paddle_negative_batch(k: int) -> onnx.ModelProto:
    """paddle2onnx (older releases) style: the batch written as ``dim_value: -1`` (not a dim_param), BN
    unfolded, Conv without bias, HardSwish, Linear as MatMul [in, out] + Add, flatten as Reshape [-1, C],
    Identity after the head, ``fetch_name_0`` output."""
    b = _Builder(6)
    size, c = 32 * k, 8 * k
    x, channels = "x", 3
    for i, width in enumerate([c, 2 * c, 4 * c]):
        w = b.init(f"conv2d_{i}.w_0", b.weight("w", (width, channels, 3, 3)))
        y = b.node("Conv", [x, w], f"p2o.Conv.{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
        bn = [b.init(f"batch_norm_{i}.{n}", v.astype(np.float32)) for n, v in [
            ("w_0", 1 + 0.1 * b.rng.standard_normal(width)), ("b_0", 0.1 * b.rng.standard_normal(width)),
            ("w_1", 0.1 * b.rng.standard_normal(width)), ("w_2", 1 + b.rng.random(width))]]
        y = b.node("BatchNormalization", [y, *bn], f"p2o.BatchNormalization.{i}", epsilon=1e-5, momentum=0.9)
        x, channels = b.node("HardSwish", [y], f"p2o.HardSwish.{i}"), width
    x = b.node("GlobalAveragePool", [x], "p2o.GlobalAveragePool.0")
    x = b.node("Reshape", [x, b.init("p2o.shape.0", np.array([-1, channels], np.int64))], "p2o.Reshape.0")
    x = b.node("MatMul", [x, b.init("linear_0.w_0", b.weight("fc", (CLASSES, channels)).T.copy())], "p2o.MatMul.0")
    x = b.node("Add", [x, b.init("linear_0.b_0", np.zeros(CLASSES, np.float32))], "p2o.Add.0")
    b.node("Identity", [x], "fetch_name_0")
    graph = helper.make_graph(b.nodes, "paddle", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [-1, 3, size, size])], [helper.make_tensor_value_info(
            "fetch_name_0", TensorProto.FLOAT, [-1, CLASSES])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)],
                              producer_name="handmade in the style of paddle2onnx (NOT paddle2onnx)")
    model.ir_version = 8
    return model


HANDMADE = [
    ("handmade_keras_mobilenet_nhwc", "keras_mobilenet", keras_mobilenet_nhwc, "tf2onnx style (handmade)", "nhwc"),
    ("handmade_tf2onnx_nhwc_avgpool", "keras_cnn_avgpool", nhwc_avgpool, "tf2onnx style (handmade)", "nhwc"),
    ("handmade_caffe2_opset8", "caffe2_cnn", caffe2_opset8, "onnx-caffe2/CNTK style (handmade)", "old-opset"),
    ("handmade_paddle_batch_minus1", "paddle_cnn", paddle_negative_batch, "paddle2onnx style (handmade)",
     "batch-dim-value-1"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", type=Path, default=None, help="write the bench sizes (width x2) to this folder")
    parser.add_argument("--only", nargs="*", default=None, help="file stems to (re)write")
    parser.add_argument("--no-torch", action="store_true", help="only the hand-written files (no torch needed)")
    args = parser.parse_args()
    out, k = (args.full, 2) if args.full else (HERE, 1)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}

    def want(stem: str) -> bool:
        return args.only is None or stem in args.only

    for stem, arch, make, exporter, variant in HANDMADE:
        if not want(stem):
            continue
        proto = make(k)
        onnx.checker.check_model(proto)
        path = out / f"{stem}.onnx"
        onnx.save(proto, str(path))
        manifest[stem] = {"file": path.name, "architecture": arch, "exporter": exporter,
                          "exporter_version": f"onnx {onnx.__version__}", "variant": variant, "opset": _opset(proto),
                          "input_shape": _shape(proto.graph.input[0]), "size_bytes": path.stat().st_size}
        print(f"{stem}: {path.stat().st_size} bytes", flush=True)
    if not args.no_torch:
        torch = _torch()
        torch.set_num_threads(2)
        for stem, arch, exporter, variant, size in TORCH_MODELS:
            if want(stem):
                manifest[stem] = export_torch(torch, stem, arch, exporter, variant, size, k, out)
                print(f"{stem}: {manifest[stem]['size_bytes']} bytes", flush=True)
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")
    too_big = [m["file"] for m in manifest.values() if k == 1 and m["size_bytes"] > 2_000_000]
    if too_big:
        print(f"over 2 MB: {too_big}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

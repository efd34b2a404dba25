"""Export small PaddlePaddle image classifiers to ONNX with paddle2onnx (via paddle.onnx.export).

Needs (in a throwaway venv, NOT the project venv):
    pip install paddlepaddle==3.3.1 paddle2onnx==2.1.0 packaging onnxruntime onnx_graphsurgeon sympy
    (tested with paddlepaddle 3.3.1 (CPU), paddle2onnx 2.1.0, onnx 1.17.0, polygraphy 0.53.6,
     onnxruntime 1.32.0, onnx_graphsurgeon 0.6.1, numpy 2.4.6, Python 3.11.
     paddle2onnx 2.1.0 imports `packaging` without declaring it; its constant folding step runs
     polygraphy, which otherwise pip-installs onnxruntime/onnx_graphsurgeon/sympy at export time)

Run from the repository root:
    python models/exporters/export_paddle.py

Writes tests/models/exported/paddle2onnx_*.onnx and models/exporters/meta_paddle.json.
"""
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import paddle
import paddle.nn as nn
import paddle2onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synth_data import make_batch  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "models", "exported")
META = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meta_paddle.json")
NUM_CLASSES = 10
ENTRIES = []


class ConvBN(nn.Layer):
    def __init__(self, cin, cout, k, s, groups=1, act="relu"):
        super().__init__()
        self.conv = nn.Conv2D(cin, cout, k, s, k // 2, groups=groups, bias_attr=False)
        self.bn = nn.BatchNorm2D(cout)
        self.act = {"relu": nn.ReLU(), "hardswish": nn.Hardswish(), None: nn.Identity()}[act]

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Block(nn.Layer):
    def __init__(self, cin, cout, s):
        super().__init__()
        self.c1 = ConvBN(cin, cout, 3, s)
        self.c2 = ConvBN(cout, cout, 3, 1, act=None)
        self.short = None if (s == 1 and cin == cout) else ConvBN(cin, cout, 1, s, act=None)
        self.relu = nn.ReLU()

    def forward(self, x):
        idt = x if self.short is None else self.short(x)
        return self.relu(self.c2(self.c1(x)) + idt)


class TinyResNet(nn.Layer):
    """PaddleClas-ResNet-like: stem ConvBN, 3 blocks (8,16,32), AdaptiveAvgPool, Flatten, Linear. 9 convs."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 8, 3, 1)
        self.pool0 = nn.MaxPool2D(2, 2)
        self.blocks = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2), Block(16, 32, 2))
        self.gap = nn.AdaptiveAvgPool2D(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        return self.fc(self.flatten(self.gap(self.blocks(self.pool0(self.stem(x))))))


class TinyMobileNetV3(nn.Layer):
    """MobileNetV3-ish: hardswish stem, depthwise-separable blocks with a squeeze-excite, 2 Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 8, 3, 2, act="hardswish")
        self.dw1 = ConvBN(8, 8, 3, 1, groups=8)
        self.pw1 = ConvBN(8, 16, 1, 1, act=None)
        self.dw2 = ConvBN(16, 16, 3, 2, groups=16, act="hardswish")
        self.se_pool = nn.AdaptiveAvgPool2D(1)
        self.se_fc1 = nn.Conv2D(16, 4, 1)
        self.se_fc2 = nn.Conv2D(4, 16, 1)
        self.pw2 = ConvBN(16, 32, 1, 1, act="hardswish")
        self.gap = nn.AdaptiveAvgPool2D(1)
        self.fc1 = nn.Linear(32, 32)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        x = self.pw1(self.dw1(self.stem(x)))
        x = self.dw2(x)
        s = nn.functional.hardsigmoid(self.se_fc2(nn.functional.relu(self.se_fc1(self.se_pool(x)))))
        x = self.pw2(x * s)
        x = paddle.flatten(self.gap(x), 1)
        return self.fc2(self.drop(nn.functional.hardswish(self.fc1(x))))


def make(cls, seed, res, steps=150):
    """Build and quick-train on the synthetic 10-class data of synth_data.py."""
    paddle.seed(seed)
    m = cls()
    opt = paddle.optimizer.Adam(learning_rate=5e-3, parameters=m.parameters())
    m.train()
    for step in range(steps):
        x, y = make_batch(64, res, seed=1000 * seed + step)
        loss = nn.functional.cross_entropy(m(paddle.to_tensor(x)), paddle.to_tensor(y))
        loss.backward()
        opt.step()
        opt.clear_grad()
    m.eval()
    x, y = make_batch(256, res, seed=999_999)
    with paddle.no_grad():
        acc = (m(paddle.to_tensor(x)).numpy().argmax(1) == y).mean()
    print(f"{cls.__name__}: final loss {float(loss):.3f}, synthetic val acc {acc:.3f}")
    return m


def export(model, fname, res, opset, batch, quirks):
    spec = [paddle.static.InputSpec(shape=[batch, 3, res, res], dtype="float32", name="x")]
    tmp = tempfile.mkdtemp()
    try:
        prefix = os.path.join(tmp, "model")
        paddle.onnx.export(model, prefix, input_spec=spec, opset_version=opset)
        shutil.move(prefix + ".onnx", os.path.join(OUT, fname))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # reference I/O computed by Paddle itself (synthetic input)
    x, _ = make_batch(batch or 2, res, seed=4242, labels=list(range(batch or 2)))
    with paddle.no_grad():
        y = model(paddle.to_tensor(x)).numpy()
    np.savez_compressed(os.path.join(OUT, fname[:-len(".onnx")] + ".ref.npz"), input=x, output_0=y)
    ENTRIES.append(dict(file=fname, exporter="paddle2onnx (paddle.onnx.export)",
                        exporter_version=f"paddle2onnx {paddle2onnx.__version__} / paddlepaddle {paddle.__version__}",
                        layout="NCHW", logits_output=None, num_classes=NUM_CLASSES, quirks=quirks))
    print("wrote", fname, os.path.getsize(os.path.join(OUT, fname)))


def main():
    os.makedirs(OUT, exist_ok=True)
    paddle.set_device("cpu")
    export(make(TinyResNet, 0, 32), "paddle2onnx_resnet_opset11.onnx", 32, 11, None,
           ["paddle_style_tensor_names", "output_named_fetch_name_0", "empty_producer_name",
            "dynamic_batch_named_DynamicDimension", "batchnorm_nodes_not_folded", "conv_without_bias",
            "linear_as_matmul_in_out_weight_plus_add", "flatten_as_shape_slice_concat_reshape",
            "identity_after_add"])
    export(make(TinyMobileNetV3, 1, 64), "paddle2onnx_mobilenetv3_opset13.onnx", 64, 13, 1,
           ["paddle_style_tensor_names", "output_named_fetch_name_0", "empty_producer_name", "static_shape",
            "batchnorm_nodes_not_folded", "conv_without_bias", "depthwise_conv_group_eq_channels",
            "hardswish_as_hardsigmoid_mul", "squeeze_excite_conv_bias_as_separate_add",
            "linear_as_matmul_in_out_weight_plus_add", "dropout_as_identity", "identity_after_add",
            "input_64x64"])
    with open(META, "w") as fh:
        json.dump(ENTRIES, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())

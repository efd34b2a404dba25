"""Export small PyTorch image classifiers to ONNX with the real PyTorch exporters.

Needs (in a throwaway venv, NOT the project venv):
    pip install torch==2.13.0 onnx==1.17.0 onnxscript==0.7.2   # onnxscript pulls onnx-ir 1.1.0
    (tested with torch 2.13.0+cpu, onnx 1.17.0, onnxscript 0.7.2, onnx-ir 1.1.0, numpy 2.4.6, Python 3.11)

Run from the repository root:
    python models/exporters/export_torch.py

Writes tests/models/exported/torch_*.onnx (+ one .onnx.data external-data file) and
models/exporters/meta_torch.json (per-file metadata that make_manifest.py merges
into tests/models/exported/manifest.json).

Each net is quick-trained (seeded, ~150 Adam steps, seconds on CPU) on the synthetic 10-class
data of synth_data.py, so logits depend on the input and BN statistics/affine params are real.
Each model gets a <stem>.ref.npz with a synthetic input and the PyTorch outputs.
"""
import json
import os
import shutil
import sys
import tempfile

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synth_data import make_batch  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "models", "exported")
META = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meta_torch.json")
NUM_CLASSES = 10


# ----------------------------------------------------------------------------- nets
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + idt)


class TinyResNet(nn.Module):
    """ResNet-like: stem conv + maxpool, 3 basic blocks (8,16,32 ch), GAP, Linear. 9 convs (1 stem + 2+3+3), 1 Linear."""

    def __init__(self, num_classes=NUM_CLASSES, widths=(8, 16, 32), softmax=False, two_outputs=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.layer1 = BasicBlock(widths[0], widths[0], 1)
        self.layer2 = BasicBlock(widths[0], widths[1], 2)
        self.layer3 = BasicBlock(widths[1], widths[2], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        self.softmax = softmax
        self.two_outputs = two_outputs

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        feat = torch.flatten(self.pool(x), 1)
        logits = self.fc(feat)
        if self.softmax:
            return torch.softmax(logits, dim=1)
        if self.two_outputs:
            return feat, logits  # features FIRST, logits second
        return logits


def dw_sep(cin, cout, stride):
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class TinyMobileNet(nn.Module):
    """MobileNetV1-like: stem conv, 4 depthwise-separable blocks, GAP, 2-layer MLP head (Dropout)."""

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
            dw_sep(8, 16, 1), dw_sep(16, 32, 2), dw_sep(32, 32, 1), dw_sep(32, 64, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(64, 32), nn.ReLU(inplace=True), nn.Dropout(0.2),
                                        nn.Linear(32, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def make(cls, seed, res=32, freeze_bn_affine=False, steps=150, **kw):
    """Build and quick-train on synth_data (a few seconds on CPU). With freeze_bn_affine the BN
    gamma/beta stay at their init values (1, 0), as in BN-frozen fine-tuning."""
    torch.manual_seed(seed)
    m = cls(**kw)
    head_softmax = getattr(m, "softmax", False)
    two = getattr(m, "two_outputs", False)
    if hasattr(m, "softmax"):
        m.softmax = m.two_outputs = False  # train on logits
    params = [p for n, p in m.named_parameters()
              if not (freeze_bn_affine and n.rsplit(".", 1)[-1] in ("weight", "bias") and p.dim() == 1
                      and not n.startswith(("fc", "classifier")))]
    opt = torch.optim.Adam(params, lr=5e-3)
    m.train()
    for step in range(steps):
        x, y = make_batch(64, res, seed=1000 * seed + step)
        loss = nn.functional.cross_entropy(m(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    x, y = make_batch(256, res, seed=999_999)
    with torch.no_grad():
        acc = (m(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    print(f"{cls.__name__} seed={seed}: final loss {loss.item():.3f}, synthetic val acc {acc:.3f}")
    if hasattr(m, "softmax"):
        m.softmax, m.two_outputs = head_softmax, two
    return m


def ref_input(n, res, dtype=torch.float32):
    x, _ = make_batch(n, res, seed=4242, labels=list(range(n)))
    return torch.from_numpy(x).to(dtype)


# ----------------------------------------------------------------------------- export helpers
ENTRIES = []


def save_ref(fname, model, x):
    """Reference I/O computed by PyTorch itself: <stem>.ref.npz with 'input' and 'output_<i>'
    (graph-output order), so a test can compare an ONNX runtime / the frontend against the framework."""
    with torch.no_grad():
        y = model(x)
    ys = y if isinstance(y, tuple) else (y,)
    arrs = {"input": x.numpy()}
    arrs.update({f"output_{i}": t.numpy() for i, t in enumerate(ys)})
    import numpy as np
    np.savez_compressed(os.path.join(OUT, fname[:-len(".onnx")] + ".ref.npz"), **arrs)


def record(fname, *, exporter, quirks, logits_output=None, input_shape=None, extra_files=()):
    ENTRIES.append(dict(file=fname, exporter=exporter, exporter_version=torch.__version__,
                        layout="NCHW", logits_output=logits_output, num_classes=NUM_CLASSES,
                        quirks=list(quirks), extra_files=list(extra_files)))
    print("wrote", fname, os.path.getsize(os.path.join(OUT, fname)), "bytes")


def ts_export(model, x, fname, **kw):
    path = os.path.join(OUT, fname)
    torch.onnx.export(model, (x,), path, dynamo=False, **kw)
    return path


def main():
    os.makedirs(OUT, exist_ok=True)
    x32 = torch.randn(1, 3, 32, 32)

    # 1. TorchScript exporter, opset 11, eval mode -> Conv+BN folded, static shape
    m = make(TinyResNet, 0)
    ts_export(m, x32, "torch_resnet_opset11.onnx", opset_version=11,
              input_names=["input"], output_names=["logits"])
    save_ref("torch_resnet_opset11.onnx", m, ref_input(1, 32))
    record("torch_resnet_opset11.onnx", exporter="torch.onnx (TorchScript)", logits_output=None,
           quirks=["bn_folded_into_conv_bias", "static_shape", "gemm_head", "maxpool",
                   "global_average_pool", "residual_add", "flatten"])

    # 2. TorchScript exporter, opset 17, dynamic batch / height / width
    ts_export(m, x32, "torch_resnet_opset17_dynamic.onnx", opset_version=17,
              input_names=["input"], output_names=["logits"],
              dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}})
    save_ref("torch_resnet_opset17_dynamic.onnx", m, torch.from_numpy(make_batch(2, 48, seed=4242)[0][:, :, :, 4:44].copy()))
    record("torch_resnet_opset17_dynamic.onnx", exporter="torch.onnx (TorchScript)",
           quirks=["bn_folded_into_conv_bias", "dynamic_batch", "dynamic_height_width", "gemm_head",
                   "global_average_pool", "residual_add"])

    # 3. BN NOT folded: TrainingMode.PRESERVE (model in eval) + no constant folding,
    #    default (auto-generated) tensor names. Trained with BN gamma/beta frozen at (1, 0), so the
    #    exporter deduplicates identical BN parameters and feeds them through Identity nodes.
    mu = make(TinyResNet, 10, freeze_bn_affine=True)
    ts_export(mu, x32, "torch_resnet_bn_unfolded.onnx", opset_version=13,
              training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    save_ref("torch_resnet_bn_unfolded.onnx", mu, ref_input(1, 32))
    record("torch_resnet_bn_unfolded.onnx", exporter="torch.onnx (TorchScript)",
           quirks=["batchnorm_nodes_not_folded", "conv_without_bias", "auto_generated_tensor_names",
                   "numeric_output_name", "no_constant_folding",
                   "deduplicated_bn_params_through_identity_nodes", "gemm_head"])

    # 4. weights listed as graph inputs (keep_initializers_as_inputs=True), old opset 9
    ts_export(m, x32, "torch_resnet_opset9_init_as_inputs.onnx", opset_version=9,
              keep_initializers_as_inputs=True, input_names=["data"], output_names=["prob_logits"])
    save_ref("torch_resnet_opset9_init_as_inputs.onnx", m, ref_input(1, 32))
    record("torch_resnet_opset9_init_as_inputs.onnx", exporter="torch.onnx (TorchScript)",
           quirks=["initializers_listed_as_graph_inputs", "old_opset_9", "bn_folded_into_conv_bias",
                   "gemm_head"])

    # 5. trailing Softmax: the single output is probabilities, not logits
    ms = make(TinyResNet, 1, softmax=True)
    ts_export(ms, x32, "torch_resnet_softmax.onnx", opset_version=13,
              input_names=["input"], output_names=["probs"])
    save_ref("torch_resnet_softmax.onnx", ms, ref_input(1, 32))
    record("torch_resnet_softmax.onnx", exporter="torch.onnx (TorchScript)",
           quirks=["trailing_softmax", "output_is_probabilities", "bn_folded_into_conv_bias", "gemm_head"])

    # 6. two outputs: (features, logits) -- logits is the SECOND output
    m2 = make(TinyResNet, 2, two_outputs=True)
    ts_export(m2, x32, "torch_resnet_two_outputs.onnx", opset_version=13,
              input_names=["input"], output_names=["features", "logits"],
              dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}, "logits": {0: "batch"}})
    save_ref("torch_resnet_two_outputs.onnx", m2, ref_input(2, 32))
    record("torch_resnet_two_outputs.onnx", exporter="torch.onnx (TorchScript)", logits_output="logits",
           quirks=["two_outputs", "logits_is_second_output", "dynamic_batch", "bn_folded_into_conv_bias"])

    # 7. MobileNet-like with depthwise convs, ReLU6 -> Clip, 64x64 input, 2 Gemm head
    mm = make(TinyMobileNet, 3, res=64)
    x64 = torch.randn(1, 3, 64, 64)
    ts_export(mm, x64, "torch_mobilenet_opset13.onnx", opset_version=13,
              input_names=["input"], output_names=["logits"],
              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    save_ref("torch_mobilenet_opset13.onnx", mm, ref_input(2, 64))
    record("torch_mobilenet_opset13.onnx", exporter="torch.onnx (TorchScript)",
           quirks=["depthwise_conv_group_eq_channels", "relu6_as_clip", "clip_min_max_from_constant_nodes",
                   "two_gemm_mlp_head",
                   "dropout_removed_in_eval", "dynamic_batch", "bn_folded_into_conv_bias", "input_64x64"])

    # 8. float16 export (model.half()): fp16 input/output/weights
    mh = make(TinyResNet, 4).half()
    ts_export(mh, x32.half(), "torch_resnet_fp16.onnx", opset_version=17,
              input_names=["input"], output_names=["logits"])
    save_ref("torch_resnet_fp16.onnx", mh, ref_input(1, 32, torch.float16))
    record("torch_resnet_fp16.onnx", exporter="torch.onnx (TorchScript)",
           quirks=["float16_weights", "float16_input_output", "bn_folded_into_conv_bias", "gemm_head"])

    # 9. dynamo exporter (torch.export -> onnxscript), dynamic batch
    md = make(TinyResNet, 5)
    fname = "torch_resnet_dynamo.onnx"
    prog = torch.onnx.export(md, (x32,), dynamo=True, opset_version=18,
                             input_names=["input"], output_names=["logits"],
                             dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}})
    prog.save(os.path.join(OUT, fname), external_data=False)
    save_ref(fname, md, ref_input(2, 32))
    record(fname, exporter="torch.onnx (dynamo/torch.export)",
           quirks=["dynamo_exporter", "opset_18", "dynamic_batch", "bn_folded_by_optimizer",
                   "onnxscript_style_names", "global_pool_as_reduce_mean", "flatten_as_reshape"])

    mmd = make(TinyMobileNet, 6, res=64)
    fname = "torch_mobilenet_dynamo.onnx"
    prog = torch.onnx.export(mmd, (x64,), dynamo=True, input_names=["pixel_values"], output_names=["logits"])
    prog.save(os.path.join(OUT, fname), external_data=False)
    save_ref(fname, mmd, ref_input(1, 64))
    record(fname, exporter="torch.onnx (dynamo/torch.export)",
           quirks=["dynamo_exporter", "default_opset", "depthwise_conv_group_eq_channels", "relu6_as_clip",
                   "two_matmul_or_gemm_head", "static_shape", "input_64x64", "global_pool_as_reduce_mean",
                   "flatten_as_reshape", "bn_folded_by_optimizer"])

    # 10. weights in external data, data file beside the model with a relative location
    me = make(TinyResNet, 7)
    fname, dname = "torch_resnet_external_data.onnx", "torch_resnet_external_data.onnx.data"
    for f in (fname, dname):
        if os.path.exists(os.path.join(OUT, f)):
            os.remove(os.path.join(OUT, f))
    tmp = tempfile.mkdtemp()
    try:
        prog = torch.onnx.export(me, (x32,), dynamo=True, opset_version=18,
                                 input_names=["input"], output_names=["logits"])
        # ONNXProgram.save(external_data=True) writes <name>.data beside the model, relative location
        prog.save(os.path.join(tmp, fname), external_data=True)
        produced = sorted(os.listdir(tmp))
        print("external-data export produced", produced)
        for f in produced:
            shutil.move(os.path.join(tmp, f), os.path.join(OUT, f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save_ref(fname, me, ref_input(1, 32))
    record(fname, exporter="torch.onnx (dynamo/torch.export)",
           quirks=["external_data", "data_file_relative_location", "small_initializers_kept_inline",
                   "dynamo_exporter", "opset_18", "global_pool_as_reduce_mean", "bn_folded_by_optimizer"],
           extra_files=[f for f in produced if f != fname])

    with open(META, "w") as fh:
        json.dump(ENTRIES, fh, indent=1)
    print("meta ->", META)


if __name__ == "__main__":
    sys.exit(main())

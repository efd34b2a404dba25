"""Write one OLD-STYLE ONNX classifier by hand with the `onnx` package's helpers.

THIS FILE IS NOT PRODUCED BY CAFFE2 OR CNTK. Neither exporter can be installed here
(cntk 2.7.post2 ships wheels for CPython <= 3.7 only: `pip install cntk` on Python 3.11 gives
"ERROR: No matching distribution found for cntk"; Caffe2's ONNX exporter was removed from PyTorch
and there is no `caffe2` package on PyPI). The file imitates the quirks of the files those old
exporters wrote (2018-2019 era):

  * IR version 3, default-domain opset 7 only
  * every initializer is ALSO listed in graph.input (required before IR 4)
  * Caffe2-style names: input "data", weights "conv1_w"/"conv1_b", "fc_w" ...
  * Conv with bias input; standalone BatchNormalization (opset-7 semantics, spatial=1)
  * AveragePool with an explicit kernel instead of GlobalAveragePool
  * Flatten + Gemm with transB=1 (Caffe2 FC) followed by Softmax: the only output is
    probabilities ("softmax"), as in the Caffe2 model-zoo exports
  * CNTK-style second classifier head is NOT included; one file only

Needs: pip install onnx==1.17.0 numpy     (tested with onnx 1.17.0, numpy 2.4.6)
Run from the repository root:  python models/exporters/export_handmade.py
Writes tests/models/exported/handmade_ir3_opset7.onnx and models/exporters/meta_handmade.json.
"""
import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "models", "exported")
META = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meta_handmade.json")
NUM_CLASSES = 10


def main():
    rng = np.random.default_rng(7)

    def w(*shape, fan_in=None):
        fan_in = fan_in or int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    params = {
        "conv1_w": w(16, 3, 3, 3), "conv1_b": (rng.standard_normal(16) * 0.05).astype(np.float32),
        "conv1_spatbn_s": rng.uniform(0.5, 1.5, 16).astype(np.float32),
        "conv1_spatbn_b": rng.uniform(-0.2, 0.2, 16).astype(np.float32),
        "conv1_spatbn_rm": (rng.standard_normal(16) * 0.1).astype(np.float32),
        "conv1_spatbn_riv": rng.uniform(0.5, 2.0, 16).astype(np.float32),
        "conv2_w": w(32, 16, 3, 3), "conv2_b": (rng.standard_normal(32) * 0.05).astype(np.float32),
        "conv3_w": w(32, 32, 3, 3), "conv3_b": (rng.standard_normal(32) * 0.05).astype(np.float32),
        "fc_w": w(NUM_CLASSES, 32), "fc_b": np.zeros(NUM_CLASSES, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["data", "conv1_w", "conv1_b"], ["conv1"], kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["conv1", "conv1_spatbn_s", "conv1_spatbn_b",
                                                "conv1_spatbn_rm", "conv1_spatbn_riv"],
                         ["conv1_spatbn"], epsilon=1e-5, momentum=0.9, spatial=1),
        helper.make_node("Relu", ["conv1_spatbn"], ["conv1_relu"]),
        helper.make_node("MaxPool", ["conv1_relu"], ["pool1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool1", "conv2_w", "conv2_b"], ["conv2"], kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["conv2"], ["conv2_relu"]),
        helper.make_node("Conv", ["conv2_relu", "conv3_w", "conv3_b"], ["conv3"], kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["conv3"], ["conv3_relu"]),
        helper.make_node("AveragePool", ["conv3_relu"], ["pool5"], kernel_shape=[8, 8], strides=[1, 1]),
        helper.make_node("Flatten", ["pool5"], ["pool5_flat"], axis=1),
        helper.make_node("Gemm", ["pool5_flat", "fc_w", "fc_b"], ["fc"], alpha=1.0, beta=1.0, transB=1),
        helper.make_node("Softmax", ["fc"], ["softmax"], axis=1),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in params.items()]
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 32, 32])]
    inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in params.items()]
    outputs = [helper.make_tensor_value_info("softmax", TensorProto.FLOAT, [1, NUM_CLASSES])]
    graph = helper.make_graph(nodes, "caffe2_style_cnn", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, producer_name="handmade-onnx-helper (imitating onnx-caffe2)",
                              producer_version="0.1", opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    fname = "handmade_ir3_opset7.onnx"
    onnx.save(model, os.path.join(OUT, fname))
    print("wrote", fname, os.path.getsize(os.path.join(OUT, fname)))
    with open(META, "w") as fh:
        json.dump([dict(file=fname, exporter="handmade (onnx.helper; NOT from Caffe2/CNTK)",
                        exporter_version=f"onnx {onnx.__version__}", layout="NCHW", logits_output=None,
                        num_classes=NUM_CLASSES,
                        quirks=["NOT_FROM_A_REAL_EXPORTER", "ir_version_3", "opset_7",
                                "initializers_listed_as_graph_inputs", "caffe2_style_names",
                                "batchnorm_node_not_folded", "batchnorm_spatial_attribute",
                                "averagepool_explicit_kernel_instead_of_global", "gemm_transB_1",
                                "trailing_softmax", "output_is_probabilities", "static_shape"])],
                  fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())

"""Export small Keras (TensorFlow) image classifiers to ONNX with tf2onnx.

Needs (in a throwaway venv, NOT the project venv):
    pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0
    (tested with tensorflow-cpu 2.21.0, keras 3.15.1, tf2onnx 1.17.0, onnx 1.23.2 [pulled in by
     tf2onnx; the files are written at IR version <= 10 so onnx 1.17 / ORT 1.19 read them],
     numpy 2.4.6, Python 3.11)

Run from the repository root:
    python models/exporters/export_tf.py

Writes tests/models/exported/tf2onnx_*.onnx and models/exporters/meta_tf.json.
Keras models are NHWC (channels-last): the ONNX input is [N, H, W, C] and tf2onnx inserts a
Transpose to NCHW in front of the first Conv.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synth_data import make_batch  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
import keras  # noqa: E402
from keras import layers  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "models", "exported")
META = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meta_tf.json")
NUM_CLASSES = 10
ENTRIES = []


def small_cnn(softmax):
    """Conv-BN-ReLU stem, DepthwiseConv2D + pointwise, residual-free VGG-ish body, GAP, 2 Dense."""
    inp = keras.Input(shape=(32, 32, 3), name="image")
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU(6.0, name="relu2")(x)
    x = layers.Conv2D(16, 1, name="pw2")(x)
    x = layers.ReLU(name="relu3")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="conv3")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(32, activation="relu", name="fc1")(x)
    x = layers.Dense(NUM_CLASSES, activation="softmax" if softmax else None, name="fc2")(x)
    return keras.Model(inp, x, name="small_cnn_softmax" if softmax else "small_cnn")


def quick_train(model, seed):
    """Quick training on the synthetic 10-class data of synth_data.py (NHWC)."""
    x, y = make_batch(4096, 32, seed=seed, layout="NHWC")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=not model.name.endswith("softmax"))
    model.compile(optimizer=keras.optimizers.Adam(5e-3), loss=loss, metrics=["accuracy"])
    model.fit(x, y, epochs=3, batch_size=64, verbose=0)
    xv, yv = make_batch(256, 32, seed=999_999, layout="NHWC")
    print(model.name, "synthetic val acc", model.evaluate(xv, yv, verbose=0)[1])


def export(model, fname, opset, quirks):
    spec = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="image"),)
    path = os.path.join(OUT, fname)
    try:
        onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset, output_path=path)
        how = "tf2onnx.convert.from_keras"
    except Exception as e:  # noqa: BLE001  (Keras 3 models are not always accepted by from_keras)
        print("from_keras failed:", type(e).__name__, str(e)[:300], "-> using from_function")

        @tf.function(input_signature=spec)
        def serve(image):
            return {"logits" if not model.name.endswith("softmax") else "probs": model(image, training=False)}

        onnx_model, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset, output_path=path)
        how = "tf2onnx.convert.from_function(tf.function(keras_model))"
    # reference I/O computed by Keras itself (synthetic NHWC input, batch 2)
    x, _ = make_batch(2, 32, seed=4242, layout="NHWC", labels=[0, 1])
    y = model(x, training=False)
    np.savez_compressed(os.path.join(OUT, fname[:-len(".onnx")] + ".ref.npz"), input=x, output_0=np.asarray(y))
    ENTRIES.append(dict(file=fname, exporter="tf2onnx (" + how + ")",
                        exporter_version=f"tf2onnx {tf2onnx.__version__} / tensorflow {tf.__version__} / "
                                         f"keras {keras.__version__}",
                        layout="NHWC", logits_output=None, num_classes=NUM_CLASSES, quirks=quirks))
    print("wrote", fname, os.path.getsize(path))
    return onnx_model


def main():
    os.makedirs(OUT, exist_ok=True)
    keras.utils.set_random_seed(0)
    m = small_cnn(softmax=False)
    quick_train(m, 0)
    export(m, "tf2onnx_keras_cnn_opset13.onnx", 13,
           ["nhwc_input", "transpose_to_nchw_inside_graph", "dense_as_matmul_plus_add",
            "depthwise_conv_group_eq_channels", "relu6_as_clip", "dynamic_batch_unk_dim",
            "tensor_names_with_colon_suffix", "output_named_after_keras_layer",
            "first_bn_folded_into_conv", "bn_after_depthwise_left_as_mul_add",
            "squeeze_after_global_average_pool", "extra_opset_import_ai_onnx_ml"])

    keras.utils.set_random_seed(1)
    ms = small_cnn(softmax=True)
    quick_train(ms, 1)
    export(ms, "tf2onnx_keras_cnn_softmax_opset13.onnx", 13,
           ["nhwc_input", "transpose_to_nchw_inside_graph", "dense_as_matmul_plus_add",
            "trailing_softmax", "output_is_probabilities", "depthwise_conv_group_eq_channels",
            "relu6_as_clip", "dynamic_batch_unk_dim", "tensor_names_with_colon_suffix",
            "output_named_after_keras_layer", "first_bn_folded_into_conv",
            "bn_after_depthwise_left_as_mul_add", "extra_opset_import_ai_onnx_ml"])
    with open(META, "w") as fh:
        json.dump(ENTRIES, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())

"""Preprocess recipes: presets, YAML files, guesses from input shapes, and the pixel arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from impq_onnx.data import PRESETS, Preprocess, infer_preprocess, preprocess_from_mapping, preprocess_from_yaml
from impq_onnx.data.preprocess import fit_image, to_model_input
from impq_onnx.errors import ConfigError, DataError


def test_presets_hold_the_published_statistics():
    assert PRESETS["imagenet"].size == (224, 224) and PRESETS["imagenet"].resize == 256
    assert PRESETS["imagenet"].mean == (0.485, 0.456, 0.406)
    assert PRESETS["cifar"].std == (0.2470, 0.2435, 0.2616) and PRESETS["cifar"].resize is None
    assert PRESETS["fashion-mnist"].channels == "L" and PRESETS["fashion-mnist"].sample_shape == (1, 28, 28)
    assert PRESETS["cifar"].replace(layout="NHWC").sample_shape == (32, 32, 3)


def test_yaml_with_preset_base_and_overrides(tmp_path):
    path = tmp_path / "pre.yaml"
    path.write_text("preset: cifar\nlayout: NHWC\nchannels: BGR\nvalue_scale: 255\n")
    pre = preprocess_from_yaml(path)
    assert pre == Preprocess(
        size=(32, 32),
        resize=None,
        mean=PRESETS["cifar"].mean,
        std=PRESETS["cifar"].std,
        value_scale=255.0,
        channels="BGR",
        layout="NHWC",
    )


def test_yaml_without_preset_needs_size_mean_std(tmp_path):
    path = tmp_path / "pre.yaml"
    path.write_text("size: [20, 30]\nmean: [0.5, 0.5, 0.5]\nstd: 0.25\n")
    with pytest.raises(ConfigError, match="std"):
        preprocess_from_yaml(path)  # one std value for three channels
    path.write_text("size: [20, 30]\nmean: [0.5, 0.5, 0.5]\nstd: [0.25, 0.25, 0.25]\nresize: 40\n")
    pre = preprocess_from_yaml(path)
    assert pre.size == (20, 30) and pre.resize == 40 and pre.std == (0.25, 0.25, 0.25)
    path.write_text("preset_name: cifar\n")
    with pytest.raises(ConfigError, match="preset_name.*did you mean 'preset'"):
        preprocess_from_yaml(path)
    path.write_text("layout: NCHW\n")
    with pytest.raises(ConfigError, match="missing key"):
        preprocess_from_yaml(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("preset: cifar\nsise: [32, 32]\n", r"unknown key 'sise'; did you mean 'size'\?"),
        ("preset: cifar\nmena: [0.5]\n", r"unknown key 'mena'; did you mean 'mean'\?"),
        ("preset: cifra\n", r"unknown preset 'cifra'; did you mean 'cifar'\?"),
        ("preset: cifar\nchannels: RGBA\n", "channels 'RGBA' must be one of RGB, BGR, L"),
        ("preset: cifar\nlayout: CHW\n", "layout 'CHW'"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("preset: cifar\nsize: [: bad\n", "not valid YAML"),
    ],
)
def test_yaml_errors_name_the_key_and_the_file(tmp_path, text, expected):
    path = tmp_path / "pre.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as info:
        preprocess_from_yaml(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_yaml_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        preprocess_from_yaml(tmp_path / "missing.yaml")


def test_mapping_accepts_a_scalar_size():
    assert preprocess_from_mapping({"preset": "imagenet", "size": 299, "resize": 342}).size == (299, 299)


@pytest.mark.parametrize(
    ("shape", "layout", "expected"),
    [
        (("N", 3, 32, 32), None, PRESETS["cifar"]),
        (("N", 3, 224, 224), None, PRESETS["imagenet"]),
        ((1, 1, 28, 28), None, PRESETS["fashion-mnist"]),
        (("N", 3, "H", "W"), None, PRESETS["imagenet"]),
        ((None, 3, -1, -1), None, PRESETS["imagenet"]),
        (("N", 224, 224, 3), None, PRESETS["imagenet"].replace(layout="NHWC")),
        (("N", 32, 32, 3), None, PRESETS["cifar"].replace(layout="NHWC")),
        (("N", 3, 3, 3), "NHWC", PRESETS["imagenet"].replace(size=(3, 3), resize=None, layout="NHWC")),
        (("N", 3, 299, 299), None, PRESETS["imagenet"].replace(size=(299, 299), resize=342)),
        (("N", 3, 64, 48), None, PRESETS["imagenet"].replace(size=(64, 48), resize=None)),
    ],
)
def test_infer_preprocess_from_input_shape(shape, layout, expected):
    assert infer_preprocess(shape, layout) == expected


def test_infer_preprocess_refuses_what_is_not_an_image_batch():
    with pytest.raises(DataError, match="4 channels"):
        infer_preprocess(("N", 4, 32, 32))
    with pytest.raises(DataError, match="not an image batch"):
        infer_preprocess(("N", 784))


def test_to_model_input_matches_a_hand_computation():
    pixels = np.array([[[[10, 100, 250], [0, 255, 128]]]], np.uint8)  # B=1, H=1, W=2, C=3 (RGB)
    pre = Preprocess(size=(1, 2), resize=None, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    x = to_model_input(pixels, pre)
    assert x.shape == (1, 3, 1, 2) and x.dtype == np.float32
    # channel 0 (R), pixel (0, 0): (10/255 - 0.1) / 0.5
    assert x[0, 0, 0, 0] == pytest.approx((10 / 255 - 0.1) / 0.5, abs=1e-6)
    assert x[0, 2, 0, 1] == pytest.approx((128 / 255 - 0.3) / 0.125, abs=1e-6)

    # Caffe-style: BGR order, pixels in [0, 255], mean listed blue first, no scaling.
    caffe = pre.replace(channels="BGR", value_scale=255.0, mean=(103.94, 116.78, 123.68), std=(1.0, 1.0, 1.0))
    y = to_model_input(pixels, caffe.replace(layout="NHWC"))
    assert y.shape == (1, 1, 2, 3)
    np.testing.assert_allclose(y[0, 0, 0], [250 - 103.94, 100 - 116.78, 10 - 123.68], rtol=1e-6)

    floats = pixels.astype(np.float32) / 255
    np.testing.assert_allclose(to_model_input(floats, pre), x, rtol=1e-6, atol=1e-6)


def test_fit_image_resizes_the_shorter_side_then_centre_crops():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)  # H=40, W=60
    pre = PRESETS["imagenet"].replace(size=(16, 16), resize=20)
    got = fit_image(Image.fromarray(array), pre)
    expected = np.asarray(Image.fromarray(array).resize((30, 20), Image.BILINEAR))[2:18, 7:23]
    np.testing.assert_array_equal(got, expected)
    gray = fit_image(Image.fromarray(array), PRESETS["fashion-mnist"])
    assert gray.shape == (28, 28, 1)

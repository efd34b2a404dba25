"""Issue 24, preprocessing people need: keep-aspect resize with padding (fill colour, centre or side),
letterbox, the interpolation, the value range and the channel order, all from a preprocess YAML; each
test decodes real image files it writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from impq_onnx.data import open_dataset, preprocess_from_yaml
from impq_onnx.data.preprocess import Preprocess, fit_image, to_model_input
from impq_onnx.errors import ConfigError


def _write(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _yaml(tmp_path: Path, text: str) -> Preprocess:
    path = tmp_path / "pre.yaml"
    path.write_text(text)
    return preprocess_from_yaml(path)


def _decoded(path: Path, preprocess: Preprocess) -> np.ndarray:
    with Image.open(path) as image:
        return fit_image(image, preprocess)


def test_pad_keeps_the_aspect_and_fills_centre_or_side(tmp_path: Path) -> None:
    # A 4x2 (w x h) solid red image into an 8x8 input: scaled 2x to 8x4, 2 rows of fill above and below.
    path = _write(tmp_path / "wide.png", np.tile(np.array([200, 10, 20], np.uint8), (2, 4, 1)))
    common = "size: [8, 8]\nmean: [0, 0, 0]\nstd: [1, 1, 1]\nfill: [7, 8, 9]\n"
    centred = _decoded(path, _yaml(tmp_path, common + "resize_mode: letterbox\n"))
    assert centred.shape == (8, 8, 3)
    assert (centred[2:6] == [200, 10, 20]).all()
    assert (centred[:2] == [7, 8, 9]).all() and (centred[6:] == [7, 8, 9]).all()
    side = _decoded(path, _yaml(tmp_path, common + "resize_mode: pad\npad_position: side\n"))
    assert (side[:4] == [200, 10, 20]).all() and (side[4:] == [7, 8, 9]).all()
    pad_centre = _decoded(path, _yaml(tmp_path, common + "resize_mode: pad\n"))
    assert np.array_equal(pad_centre, centred)


def test_pad_of_a_tall_image_pads_the_width(tmp_path: Path) -> None:
    path = _write(tmp_path / "tall.png", np.full((12, 3, 3), 90, np.uint8))
    pre = Preprocess(size=(8, 8), resize=None, mean=(0, 0, 0), std=(1, 1, 1), resize_mode="pad",
                     pad_position="side", fill=(255,))
    pixels = _decoded(path, pre)
    assert (pixels[:, :2] == 90).all() and (pixels[:, 2:] == 255).all()  # 3x12 -> 2x8, padded on the right


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "area"])
def test_interpolation_is_pillows_filter(interpolation: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    source = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = _write(tmp_path / "x.png", source)
    pre = Preprocess(size=(9, 13), resize=None, mean=(0, 0, 0), std=(1, 1, 1), interpolation=interpolation)
    got = _decoded(path, pre)
    filters = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "area": Image.BOX}
    expected = np.asarray(Image.fromarray(source).resize((13, 9), filters[interpolation]))
    assert np.array_equal(got, expected)


def test_nearest_upscale_duplicates_pixels(tmp_path: Path) -> None:
    source = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3) * 10
    path = _write(tmp_path / "x.png", source)
    got = _decoded(path, Preprocess(size=(4, 4), resize=None, mean=(0, 0, 0), std=(1, 1, 1),
                                    interpolation="nearest"))
    assert np.array_equal(got, source.repeat(2, axis=0).repeat(2, axis=1))


def test_value_range_and_channel_order(tmp_path: Path) -> None:
    pixel = np.array([0, 51, 255], np.uint8)
    root = tmp_path / "d"
    _write(root / "a" / "0.png", np.tile(pixel, (4, 4, 1)))
    pre = _yaml(tmp_path, "size: [4, 4]\nmean: [0, 0, 0]\nstd: [1, 1, 1]\nvalue_range: [-1, 1]\nchannels: BGR\n"
                          "layout: NHWC\n")
    x, _ = next(open_dataset(root, pre).batches(1))
    np.testing.assert_allclose(x[0, 0, 0], [1.0, 51 / 255 * 2 - 1, -1.0], atol=1e-6)  # blue first
    # value_range [0, 255] is the same as value_scale 255
    a = to_model_input(np.tile(pixel, (1, 1, 1, 1)), pre.replace(value_range=(0.0, 255.0)))
    b = to_model_input(np.tile(pixel, (1, 1, 1, 1)), pre.replace(value_range=None, value_scale=255.0))
    assert np.array_equal(a, b)


def test_letterbox_end_to_end_through_a_folder(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _write(root / "a" / "0.png", np.full((10, 30, 3), 255, np.uint8))
    _write(root / "b" / "0.jpg", np.full((30, 10, 3), 255, np.uint8))
    pre = _yaml(tmp_path, "preset: imagenet\nsize: [12, 12]\nresize: null\nresize_mode: letterbox\n"
                          "fill: 0\ninterpolation: bicubic\nmean: [0, 0, 0]\nstd: [1, 1, 1]\n")
    x, y = next(open_dataset(root, pre).batches(2))
    assert x.shape == (2, 3, 12, 12) and y.tolist() == [0, 1]
    assert (x[0, :, :4] == 0).all() and (x[0, :, 4:8] > 0.9).all() and (x[0, :, 8:] == 0).all()
    assert (x[1, :, :, :4] == 0).all() and (x[1, :, :, 4:8] > 0.9).all() and (x[1, :, :, 8:] == 0).all()


@pytest.mark.parametrize(("text", "message"), [
    ("resize_mode: squash\n", "resize_mode 'squash' must be one of"),
    ("interpolation: cubic\n", "interpolation 'cubic' must be one of"),
    ("resize_mode: pad\npad_position: bottom\n", "pad_position 'bottom'"),
    ("resize_mode: pad\nfill: [1, 2]\n", "fill"),
    ("resize_mode: pad\nfill: 300\n", "fill"),
    ("value_range: [1, -1]\n", "value_range"),
    ("resize: 20\nresize_mode: letterbox\n", "resize_mode crop only"),
    ("value_range: [-.inf, .inf]\n", "value_range .* must be finite numbers"),
    ("value_scale: .inf\n", "value_scale .* must be finite numbers"),
])
def test_bad_values_are_config_errors_naming_the_key(text: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        _yaml(tmp_path, "size: [8, 8]\nmean: [0, 0, 0]\nstd: [1, 1, 1]\n" + text)


@pytest.mark.parametrize(("mean", "std", "message"), [
    ("[0, .nan, 0]", "[1, 1, 1]", r"mean \[0.0, nan, 0.0\] must be finite numbers"),
    ("[0, 0, 0]", "[1, .nan, 1]", r"std \[1.0, nan, 1.0\] must be finite numbers"),  # nan passed "std > 0"
    ("[.inf, 0, 0]", "[1, 1, 1]", "mean .* must be finite numbers"),
])
def test_a_mean_or_std_that_is_not_finite_is_refused(mean: str, std: str, message: str, tmp_path: Path) -> None:
    """Before: every image became NaN, evaluate scored 10 % (one class) and exited 0 without a word."""
    with pytest.raises(ConfigError, match=message):
        _yaml(tmp_path, f"size: [8, 8]\nmean: {mean}\nstd: {std}\n")

"""ImageFolder trees of real image files written by Pillow: ordering, labels, decoding, errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from impq_onnx.data import PRESETS, Preprocess, open_dataset
from impq_onnx.errors import DataError

RED, GREEN, BLUE = (200, 10, 20), (5, 180, 40), (30, 60, 250)
RAW = Preprocess(size=(4, 4), resize=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), value_scale=255.0)


def _solid(path, colour, size=(4, 4), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


@pytest.fixture
def tree(tmp_path):
    """Classes 'b', 'a', 'C' (sorted by code point: C, a, b), mixed extension case, clutter to ignore."""
    root = tmp_path / "images"
    _solid(root / "b" / "2.png", BLUE)
    _solid(root / "b" / "1.PNG", BLUE)
    _solid(root / "a" / "x.bmp", GREEN)
    _solid(root / "a" / "nested" / "y.png", GREEN)
    _solid(root / "C" / "z.JPEG", RED, fmt="JPEG")
    _solid(root / "C" / "w.jpg", RED, fmt="JPEG")
    (root / "a" / "notes.txt").write_text("not an image")
    _solid(root / "a" / ".hidden.png", GREEN)
    _solid(root / ".cache" / "junk.png", GREEN)
    return root


def test_classes_sorted_files_sorted_labels_follow(tree):
    data = open_dataset(tree, RAW)
    assert data.classes == ("C", "a", "b")
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    names = [data.describe(i).split("images/")[1] for i in range(len(data))]
    assert names == ["C/w.jpg", "C/z.JPEG", "a/nested/y.png", "a/x.bmp", "b/1.PNG", "b/2.png"]
    assert data.labelled


def test_pixels_arrive_in_rgb_bgr_and_both_layouts(tree):
    x, y = next(open_dataset(tree, RAW).batches(6))
    assert x.shape == (6, 3, 4, 4) and x.dtype == np.float32 and y.tolist() == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(x[4, :, 0, 0], BLUE)  # PNG is lossless
    np.testing.assert_array_equal(x[3, :, 2, 1], GREEN)  # and so is BMP
    assert np.abs(x[0, :, 1, 1] - RED).max() <= 4  # JPEG is not
    bgr, _ = next(open_dataset(tree, RAW.replace(channels="BGR", layout="NHWC")).batches(6))
    assert bgr.shape == (6, 4, 4, 3)
    np.testing.assert_array_equal(bgr[4, 0, 0], BLUE[::-1])


def test_grayscale_uses_pillow_luma(tree):
    gray = RAW.replace(channels="L", mean=(0.0,), std=(1.0,))
    x, _ = next(open_dataset(tree, gray).batches(6))
    assert x.shape == (6, 1, 4, 4)
    r, g, b = BLUE
    assert x[5, 0, 0, 0] == round((r * 299 + g * 587 + b * 114) / 1000)


def test_normalisation_against_a_hand_computation(tree):
    x, _ = next(open_dataset(tree, PRESETS["cifar"]).batches(6))
    assert x.shape == (6, 3, 32, 32)  # 4x4 files are resized to the model size
    mean, std = PRESETS["cifar"].mean, PRESETS["cifar"].std
    expected = [(BLUE[c] / 255 - mean[c]) / std[c] for c in range(3)]
    np.testing.assert_allclose(x[5, :, 16, 16], expected, rtol=1e-5)


def test_limit_per_class_keeps_the_first_files(tree):
    data = open_dataset(tree, RAW, limit_per_class=1)
    assert data.labels.tolist() == [0, 1, 2]
    assert data.describe(1).endswith("a/nested/y.png")


def test_flat_folder_is_unlabeled(tmp_path):
    for i in range(3):
        _solid(tmp_path / f"{i}.png", RED)
    data = open_dataset(tmp_path, RAW)
    assert data.classes == () and data.labels.tolist() == [-1, -1, -1] and not data.labelled


def test_empty_class_folder_warns_and_keeps_label_numbering(tree, caplog):
    (tree / "B-empty").mkdir()
    with caplog.at_level(logging.WARNING):
        data = open_dataset(tree, RAW)
    assert "B-empty" in caplog.text
    assert data.classes == ("B-empty", "C", "a", "b") and data.labels.tolist() == [1, 1, 2, 2, 3, 3]


def test_missing_path_and_empty_folders_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        open_dataset(tmp_path / "nowhere", RAW)
    with pytest.raises(DataError, match="no images found"):
        open_dataset(tmp_path, RAW)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images found") as info:
        open_dataset(tmp_path, RAW)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(DataError, match="not a folder or an .npz"):
        open_dataset(tmp_path / "data.csv", RAW)


def test_corrupt_image_is_named_and_batches_decode_lazily(tree):
    bad = tree / "b" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(DataError, match=r"3\.png.*cannot decode") as info:
        open_dataset(tree, RAW)  # every image is checked when the data is opened
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    data = open_dataset(tree, RAW, check=False)  # unchecked, scanning does not decode
    batches = data.batches(2)
    x, _ = next(batches)  # the first batches do not touch the corrupt file
    assert x.shape == (2, 3, 4, 4)
    with pytest.raises(DataError, match=r"3\.png.*cannot decode") as info:
        list(batches)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_threaded_decoding_gives_the_same_batches(tree):
    one = [x for x, _ in open_dataset(tree, PRESETS["cifar"]).batches(4, shuffle=True, seed=3)]
    many = [x for x, _ in open_dataset(tree, PRESETS["cifar"], workers=3).batches(4, shuffle=True, seed=3)]
    assert all(np.array_equal(a, b) for a, b in zip(one, many)) and len(one) == len(many) == 2


def test_the_bundled_fashion_mnist_subset_opens():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "models" / "fashion-mnist"
    train = open_dataset(root / "train", PRESETS["fashion-mnist"])
    test = open_dataset(root / "test", PRESETS["fashion-mnist"])
    assert train.classes == test.classes and train.classes[0] == "0-tshirt" and train.classes[9] == "9-ankle-boot"
    assert np.bincount(train.labels).tolist() == [60] * 10 and np.bincount(test.labels).tolist() == [20] * 10
    x, y = next(test.batches(200))
    assert x.shape == (200, 1, 28, 28)
    # Normalised with the dataset's own statistics, so roughly zero-mean, unit-std.
    assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2

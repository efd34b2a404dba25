"""Datasets from .npz arrays: accepted shapes and dtypes, labels, errors, agreement with image files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from impq_onnx.data import PRESETS, Preprocess, dataset_from_arrays, open_dataset
from impq_onnx.errors import DataError

RAW = Preprocess(size=(5, 6), resize=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), value_scale=255.0)


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)


def test_nhwc_uint8_with_labels(tmp_path, images):
    path = tmp_path / "d.npz"
    np.savez(path, x=images, y=np.array([0, 1, 2, 0, 1, 2, 4]))
    data = open_dataset(path, RAW)
    assert data.classes == ("0", "1", "2", "3", "4") and data.labels.dtype == np.int64
    x, y = next(data.batches(7))
    np.testing.assert_array_equal(x, images.transpose(0, 3, 1, 2).astype(np.float32))
    assert y.tolist() == [0, 1, 2, 0, 1, 2, 4] and data.describe(2) == f"{path}[2]"


def test_nchw_float_without_labels(tmp_path, images):
    path = tmp_path / "d.npz"
    np.savez(path, x=images.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    data = open_dataset(path, RAW.replace(layout="NHWC"))
    assert data.classes == () and (data.labels == -1).all()
    x, _ = next(data.batches(7))
    np.testing.assert_allclose(x, images.astype(np.float32), rtol=1e-5, atol=1e-4)


def test_grayscale_array_to_rgb_model_and_back(tmp_path, images):
    gray = images[..., 0]
    path = tmp_path / "g.npz"
    np.savez(path, x=gray, y=np.zeros(7, np.int64))
    x, _ = next(open_dataset(path, RAW).batches(7))
    assert x.shape == (7, 3, 5, 6) and (x[:, 0] == x[:, 2]).all() and (x[:, 1] == gray).all()
    luma = dataset_from_arrays(images, None, RAW.replace(channels="L", mean=(0.0,), std=(1.0,)))
    x, _ = next(luma.batches(7))
    pillow = np.stack([np.asarray(Image.fromarray(img).convert("L")) for img in images])
    assert np.abs(x[:, 0] - pillow).max() <= 1


def test_npz_and_the_same_images_as_files_give_the_same_batches(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 0, 1, 1, 2, 2])
    np.savez(tmp_path / "d.npz", x=images, y=labels)
    for i, (img, label) in enumerate(zip(images, labels)):
        (tmp_path / "folder" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "folder" / str(label) / f"{i}.png")
    pre = PRESETS["fashion-mnist"].replace(size=(32, 32))  # a resize, through Pillow on both paths
    a = next(open_dataset(tmp_path / "d.npz", pre).batches(6, shuffle=True, seed=2, augment=True))
    b = next(open_dataset(tmp_path / "folder", pre).batches(6, shuffle=True, seed=2, augment=True))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_limit_per_class_on_npz(tmp_path, images):
    np.savez(tmp_path / "d.npz", x=images, y=np.array([1, 0, 1, 0, 1, 0, 1]))
    data = open_dataset(tmp_path / "d.npz", RAW, limit_per_class=2)
    assert data.labels.tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"images": np.zeros((2, 4, 4), np.uint8)}, r"no array named 'x' \(found images\)"),
        ({"x": np.zeros((2, 4, 4, 5), np.uint8)}, r"shape \[2, 4, 4, 5\]"),
        ({"x": np.zeros((2, 4, 4), np.int32)}, "dtype int32"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(3, np.int64)}, "one integer label per image"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0, -2])}, "negative labels"),
        ({"x": np.zeros((0, 4, 4), np.uint8)}, "holds no images"),
        ({"x": np.array([[[0.5]], [[np.nan]]], np.float32)}, r"array 'x' holds NaN or infinite values \(image 1\)"),
        ({"x": np.full((300, 2, 2), np.inf, np.float64)}, r"NaN or infinite values \(image 0\)"),
        ({"x": np.zeros((1, 4, 4), np.uint8), "y": np.array([2**64 - 1], np.uint64)}, "labels past 2\\*\\*63"),
    ],
)
def test_npz_errors_name_the_file(tmp_path, arrays, expected):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=expected) as info:
        open_dataset(path, RAW)
    assert str(path) in str(info.value)


def test_a_truncated_npz_is_a_data_error(tmp_path):
    path = tmp_path / "cut.npz"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="cut.npz"):
        open_dataset(path, RAW)

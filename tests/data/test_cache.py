"""The decoded-image cache over real image files: same batches, reused, invalidated, written atomically."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from impq_onnx.data import PRESETS, Preprocess, open_dataset
from impq_onnx.data import cache as cache_module
from impq_onnx.data.imagefolder import ImageFiles
from impq_onnx.errors import DataError

CIFAR = PRESETS["cifar"]


def _tree(root, count=6, size=(40, 36)):
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 3 else 'jpg'}")
    return root


def _batches(dataset, **kw):
    return [(x.tobytes(), y.tobytes()) for x, y in dataset.batches(4, **kw)]


def _npy(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_cached_batches_equal_decoded_ones_and_the_file_is_reused(tmp_path, monkeypatch):
    data = _tree(tmp_path / "data")
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    cache = tmp_path / "work" / "decoded"
    plain = open_dataset(data, CIFAR)
    cached = open_dataset(data, CIFAR, cache_dir=cache)
    assert isinstance(cached.source, cache_module.DecodedImages)
    for kw in ({}, {"shuffle": True, "seed": 3, "augment": True}):
        assert _batches(cached, **kw) == _batches(plain, **kw)
    assert len(_npy(cache)) == 1 and _npy(cache)[0].endswith(".npy")  # no temporary file left
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before  # nothing written in the data folder

    def no_decoding(self, path, preprocess):
        raise AssertionError("decoded again although the cache matches")

    monkeypatch.setattr(ImageFiles, "_decode", no_decoding)
    again = open_dataset(data, CIFAR, cache_dir=cache)
    assert isinstance(again.source.array, np.memmap)
    assert _batches(again, shuffle=True, seed=3) == _batches(cached, shuffle=True, seed=3)


def test_a_changed_file_or_recipe_invalidates_the_cache(tmp_path):
    data = _tree(tmp_path / "data")
    cache = tmp_path / "decoded"
    first = open_dataset(data, CIFAR, cache_dir=cache)
    name = _npy(cache)
    changed = data / "cat" / "1.png"
    Image.new("RGB", (40, 36), (255, 0, 0)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    second = open_dataset(data, CIFAR, cache_dir=cache)
    assert _npy(cache) != name and len(_npy(cache)) == 1  # a new key; the stale file is gone
    index = [second.describe(i) for i in range(len(second))].index(str(changed))
    x_new, x_old = second.load([index]), first.load([index])
    assert not np.array_equal(x_new, x_old)
    assert np.array_equal(x_new, open_dataset(data, CIFAR).load([index]))  # the new pixels, not the cached ones
    other = Preprocess(size=(16, 16), resize=None, mean=CIFAR.mean, std=CIFAR.std)
    small = open_dataset(data, other, cache_dir=cache)
    assert small.load([0]).shape == (1, 3, 16, 16) and len(_npy(cache)) == 1
    assert np.array_equal(small.load([0]), open_dataset(data, other).load([0]))
    # a dataset whose recipe changes afterwards decodes its batches from the files
    assert np.array_equal(second.with_preprocess(other).load([0]), small.load([0]))


def test_a_damaged_cache_file_is_decoded_again(tmp_path):
    data = _tree(tmp_path / "data")
    cache = tmp_path / "decoded"
    open_dataset(data, CIFAR, cache_dir=cache)
    (cache / _npy(cache)[0]).write_bytes(b"not an npy file")
    again = open_dataset(data, CIFAR, cache_dir=cache)
    assert np.array_equal(again.load(np.arange(len(again))), open_dataset(data, CIFAR).load(np.arange(len(again))))


def test_a_broken_image_is_named_and_leaves_no_cache_file(tmp_path):
    data = _tree(tmp_path / "data")
    bad = data / "dog" / "9.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    cache = tmp_path / "decoded"
    with pytest.raises(DataError, match=r"9\.png.*cannot decode") as info:
        open_dataset(data, CIFAR, cache_dir=cache)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    assert _npy(cache) == []


def test_in_memory_decoding_and_the_size_limit(tmp_path, monkeypatch):
    data = _tree(tmp_path / "data")
    decoded = open_dataset(data, CIFAR, decode=True)
    assert isinstance(decoded.source, cache_module.DecodedImages) and decoded.source.path is None
    assert _batches(decoded) == _batches(open_dataset(data, CIFAR))
    monkeypatch.setattr(cache_module, "MAX_MEMORY_BYTES", 6 * 32 * 32 * 3 - 1)  # one byte short of the set
    assert isinstance(open_dataset(data, CIFAR, decode=True).source, ImageFiles)  # decoded on demand instead

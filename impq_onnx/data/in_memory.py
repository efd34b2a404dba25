"""Data held by the caller: numpy arrays, or any iterable or callable of batches, as one data source.

The Python API (:mod:`impq_onnx.api`) takes data in the forms other quantization tools take it, and
:func:`in_memory_data` turns each into :class:`InMemoryData`, which
:func:`~impq_onnx.data.model_data.open_model_data` opens like a folder or an ``.npz`` (the same
train / validation / test roles, splits, checks and preprocessing):

- ``images`` (a numpy array) or ``(images, labels)`` (a tuple of two arrays, ``labels`` one integer
  per image, or None);
- a mapping ``{"x": images, "y": labels}`` (the ``.npz`` keys), or ``{"train": D, "val": D, "test": D}``
  with ``train`` and any of ``val`` / ``test``, each ``D`` one of these forms (the folder layout
  ``train/`` ``val/`` ``test/``);
- any iterable of batches, each ``images``, ``(images,)``, ``(images, labels)`` or a one-entry
  ``{input name: images}`` dict (what onnxruntime's ``CalibrationDataReader.get_next`` returns);
- a callable that returns such an iterable (called once), or an object with ``get_next()``
  (onnxruntime's ``CalibrationDataReader``: read until it returns None).

Images follow the ``.npz`` convention (:mod:`impq_onnx.data.npz`): ``[N, H, W]``, ``[N, H, W, C]`` or
``[N, C, H, W]`` with C 1 or 3, uint8 in [0, 255] or float in [0, 1], preprocessed as files are. Arrays
that are model input already (normalised) go with ``preprocess="model-input"``, which feeds them
unchanged. Batches are read once, when the data is given, and kept in memory (compress reads the
training images many times, shuffled), so a one-shot iterator or reader is enough.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from impq_onnx.data.npz import channels_last, check_finite
from impq_onnx.errors import DataError

__all__ = ["ArrayData", "InMemoryData", "in_memory_data", "is_in_memory"]

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayData:
    """Images ``[N, H, W, C]`` (uint8, or float32 in [0, 1]) and labels (int64, -1 where unlabelled)."""

    images: np.ndarray
    labels: np.ndarray
    name: str = "arrays"

    def __len__(self) -> int:
        return len(self.images)

    @property
    def digest(self) -> str:
        """SHA-256 of the shape, type, pixels and labels: the data's identity for a resumed run."""
        sha = hashlib.sha256(f"{self.images.shape}/{self.images.dtype}".encode())
        sha.update(np.ascontiguousarray(self.images).tobytes())
        sha.update(np.ascontiguousarray(self.labels).tobytes())
        return sha.hexdigest()

    @property
    def label(self) -> str:
        n, h, w, c = self.images.shape
        labelled = "labelled" if (self.labels >= 0).all() and n else "unlabelled"
        return f"{self.name}: {n} {labelled} {h}x{w}x{c} {self.images.dtype} images, sha256 {self.digest[:16]}"


@dataclasses.dataclass(frozen=True, eq=False)
class InMemoryData:
    """The caller's data: the training images, and held-out validation and test images when given."""

    train: ArrayData
    val: ArrayData | None = None
    test: ArrayData | None = None

    @property
    def label(self) -> str:
        """How the outputs (report, config) record the data: sizes and content digests, not the pixels."""
        parts = [(name, getattr(self, name)) for name in SPLITS]
        return "<" + "; ".join(part.label for _, part in parts if part is not None) + ">"


def is_in_memory(data: object) -> bool:
    """True for every data form this module takes (anything but a path)."""
    import os

    return not isinstance(data, (str, bytes, os.PathLike))


def in_memory_data(data: object, name: str = "arrays") -> InMemoryData:
    """``data`` in any of the forms of the module docstring, read and checked."""
    if isinstance(data, InMemoryData):
        return data
    if isinstance(data, ArrayData):
        return InMemoryData(data)
    if isinstance(data, Mapping) and data and set(data) <= set(SPLITS):
        if "train" not in data:
            raise DataError(f"data with keys {', '.join(map(str, data))} has no 'train' entry; give "
                            "{'train': ..., 'test': ...} (and 'val' if you hold one out yourself)")
        parts = {key: array_data(value, f"{name}['{key}']") if data.get(key) is not None else None
                 for key, value in ((k, data.get(k)) for k in SPLITS)}
        return InMemoryData(parts["train"], parts["val"], parts["test"])  # type: ignore[arg-type]
    return InMemoryData(array_data(data, name))


def array_data(data: object, name: str = "arrays") -> ArrayData:
    """One set of images (and labels) from an array, an ``(images, labels)`` pair, a mapping or batches."""
    if isinstance(data, ArrayData):
        return data
    if isinstance(data, np.ndarray):
        return _checked(data, None, name)
    if isinstance(data, Mapping) and "x" in data and set(data) <= {"x", "y"}:
        return _checked(np.asarray(data["x"]), data.get("y"), name)
    if isinstance(data, tuple) and _is_pair(data):
        return _checked(np.asarray(data[0]), data[1] if len(data) > 1 else None, name)
    return _from_batches(_batches_of(data, name), name)


def _is_pair(data: tuple[Any, ...]) -> bool:
    """``(images,)`` or ``(images, labels)``: not a tuple of batches."""
    if not 1 <= len(data) <= 2 or not isinstance(data[0], np.ndarray) or data[0].ndim < 3:
        return False
    if len(data) == 1 or data[1] is None:
        return True
    labels = np.asarray(data[1])
    return labels.ndim <= 1 and labels.size == len(data[0]) and labels.dtype.kind in "iu"


def _batches_of(data: object, name: str) -> Iterable[Any]:
    get_next = getattr(data, "get_next", None)
    if callable(get_next):  # onnxruntime's CalibrationDataReader
        return iter(get_next, None)
    if callable(data) and not isinstance(data, Iterable):
        data = data()
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise DataError(f"{name}: {type(data).__name__} is not a data form impq-onnx reads; give a folder, an "
                        ".npz, numpy arrays (images, labels), or an iterable (or callable) of such batches")
    return data


def _split_batch(batch: object, name: str, index: int) -> tuple[np.ndarray, Any]:
    if isinstance(batch, Mapping):
        if "x" in batch and set(batch) <= {"x", "y"}:
            return np.asarray(batch["x"]), batch.get("y")
        if len(batch) != 1:
            raise DataError(f"{name}: batch {index} is a dict with {len(batch)} entries "
                            f"({', '.join(map(str, batch))}); a classifier takes one input: give one entry, "
                            "or 'x' (and 'y')")
        return np.asarray(next(iter(batch.values()))), None
    if isinstance(batch, (tuple, list)):
        if not 1 <= len(batch) <= 2:
            raise DataError(f"{name}: batch {index} has {len(batch)} parts; give images or (images, labels)")
        return np.asarray(batch[0]), batch[1] if len(batch) > 1 else None
    return np.asarray(batch), None


def _from_batches(batches: Iterable[Any], name: str) -> ArrayData:
    images: list[np.ndarray] = []
    labels: list[np.ndarray | None] = []
    for index, batch in enumerate(batches):
        x, y = _split_batch(batch, name, index)
        if images and (x.shape[1:] != images[0].shape[1:] or x.dtype != images[0].dtype):
            raise DataError(f"{name}: batch {index} holds {x.dtype} images of shape {list(x.shape[1:])}, batch 0 "
                            f"{images[0].dtype} of shape {list(images[0].shape[1:])}; every batch must match")
        if labels and (y is None) != (labels[0] is None):
            raise DataError(f"{name}: batch {index} {'has no' if y is None else 'has'} labels, batch 0 "
                            f"{'has' if y is None else 'has none'}; give labels with every batch or with none")
        y_array = None if y is None else np.asarray(y).reshape(-1)
        if y_array is not None and len(y_array) != len(x):
            raise DataError(f"{name}: batch {index} has {len(x)} images and {len(y_array)} labels")
        images.append(x)
        labels.append(y_array)
    if not images:
        raise DataError(f"{name}: the data yielded no batches")
    joined = None if labels[0] is None else np.concatenate([y for y in labels if y is not None])
    return _checked(np.concatenate(images), joined, name)


def _checked(x: np.ndarray, y: object, name: str) -> ArrayData:
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{name}: images have dtype {x.dtype}; use uint8 (0-255) or float (0-1, or model input "
                        "with preprocess='model-input')")
    if len(x) == 0:
        raise DataError(f"{name}: no images")
    images = channels_last(x, name, "the image array")
    if images.dtype != np.uint8:
        images = images.astype(np.float32, copy=False)
    check_finite(images, name, "the image array")
    if y is None:
        return ArrayData(images, np.full(len(images), -1, np.int64), name)
    labels = np.asarray(y).reshape(-1)
    if len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{name}: labels must be one integer per image ({len(images)}), got {labels.dtype} of "
                        f"length {len(labels)}")
    if labels.min() < 0:
        raise DataError(f"{name}: negative labels; use 0..K-1")
    return ArrayData(images, labels.astype(np.int64), name)


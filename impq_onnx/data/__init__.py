"""Image data for fine-tuning, sensitivity and evaluation: ImageFolder trees and ``.npz`` arrays.

``open_dataset(path, preprocess)`` returns a lazily decoded :class:`Dataset`; ``Preprocess`` says how
images become model input (``PRESETS``, :func:`preprocess_from_yaml`, :func:`infer_preprocess`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from impq_onnx.data.dataset import Dataset, PixelSource
from impq_onnx.data.imagefolder import ImageFiles, check_images, scan_image_folder
from impq_onnx.data.limits import shown
from impq_onnx.data.npz import ArrayImages, load_npz
from impq_onnx.data.preprocess import (
    PRESETS,
    Preprocess,
    infer_preprocess,
    preprocess_from_mapping,
    preprocess_from_yaml,
)
from impq_onnx.errors import DataError

__all__ = [
    "Preprocess",
    "PRESETS",
    "preprocess_from_yaml",
    "preprocess_from_mapping",
    "infer_preprocess",
    "Dataset",
    "PixelSource",
    "open_dataset",
    "decoded_dataset",
    "dataset_from_arrays",
]


def first_per_class(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the first ``limit`` samples of each label, in their original order."""
    keep = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        keep[np.flatnonzero(labels == label)[:limit]] = True
    return np.flatnonzero(keep)


def dataset_from_arrays(
    images: np.ndarray,
    labels: np.ndarray | None,
    preprocess: Preprocess,
    classes: tuple[str, ...] | None = None,
    name: str = "array",
) -> Dataset:
    """A Dataset over in-memory images ``[N, H, W, C]`` (uint8 0-255 or float 0-1)."""
    if images.ndim == 3:
        images = images[..., None]
    if labels is None:
        labels = np.full(len(images), -1, np.int64)
    labels = np.asarray(labels, np.int64)
    if classes is None:
        classes = tuple(str(i) for i in range(int(labels.max()) + 1)) if (labels >= 0).any() else ()
    return Dataset(ArrayImages(images, name), labels, classes, preprocess, name=name)


def decoded_dataset(dataset: Dataset, cache_dir: str | Path | None = None, check: bool = True) -> Dataset:
    """``dataset`` with every image of its folder decoded once (:mod:`impq_onnx.data.cache`; into
    ``cache_dir`` when given), which checks them; an ``.npz`` (in memory already) is returned as it is,
    and a folder too big to decode at once is decoded on demand (checked first when ``check``)."""
    if not isinstance(dataset.source, ImageFiles):
        return dataset
    from impq_onnx.data.cache import decode_once
    from impq_onnx.runtime import resolve_threads

    files = dataset.source
    decoded = decode_once(files, dataset.preprocess, cache_dir, threads=max(files.workers, resolve_threads(None)))
    if decoded is None:
        if check:
            check_images(files.paths)
        return dataset
    return Dataset(decoded, dataset.labels, dataset.classes, dataset.preprocess, dataset.items, dataset.name)


def open_dataset(
    path: str | Path,
    preprocess: Preprocess,
    *,
    limit_per_class: int | None = None,
    workers: int = 1,
    follow_links_outside: bool = False,
    check: bool = True,
    classes: tuple[str, ...] | None = None,
    decode: bool = False,
    cache_dir: str | Path | None = None,
) -> Dataset:
    """Open an ImageFolder tree (``path/<class>/*.jpg``), a flat folder of unlabeled images, or an ``.npz``.

    ``limit_per_class`` keeps the first images of each class (in sorted file order, or array order).
    ``workers`` > 1 decodes each batch's image files on that many threads (same result, any order).
    Links that lead out of the folder are followed only with ``follow_links_outside`` (see
    :mod:`impq_onnx.data.imagefolder`). ``check`` decodes every image once, cheaply, now, so that a
    broken file is a one-line error before any long run rather than in its middle or at its end.
    ``classes`` gives the model's class order for the folder names (``--classes``; not used for ``.npz``).
    ``decode`` (or a ``cache_dir``) decodes every image of a folder once now, on every available core,
    and serves batches from the decoded pixels (memory-mapped from ``cache_dir`` and reused by later runs;
    see :mod:`impq_onnx.data.cache`); that decode is the check. Results are the same either way.
    """
    path = Path(path)
    if limit_per_class is not None and limit_per_class < 1:
        raise DataError(f"limit per class {limit_per_class} must be at least 1")
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{shown(path)}: the data path is not valid UTF-8 and cannot be recorded in the outputs; "
                        "rename it or link it under a UTF-8 name") from exc
    if not path.exists():
        raise DataError(f"{shown(path)}: no such file or folder; pass an ImageFolder directory or an .npz file")
    if path.is_dir():
        scan = scan_image_folder(path, limit_per_class, follow_links_outside=follow_links_outside,
                                 classes=classes)
        dataset = Dataset(ImageFiles(scan.paths, workers), scan.labels, scan.classes, preprocess, name=str(path))
        if decode or cache_dir is not None:
            return decoded_dataset(dataset, cache_dir, check)
        if check:
            check_images(scan.paths)
        return dataset
    if path.suffix.lower() == ".npz":
        contents = load_npz(path)
        dataset = Dataset(
            ArrayImages(contents.images, str(path)), contents.labels, contents.classes, preprocess, name=str(path)
        )
        if len(dataset) == 0:
            raise DataError(f"{path}: array 'x' holds no images")
        if limit_per_class is not None:
            dataset = dataset.subset(first_per_class(dataset.labels, limit_per_class))
        return dataset
    raise DataError(
        f"{path}: not a folder or an .npz file; pass an ImageFolder directory (one subfolder per class) "
        "or an .npz with arrays x and y"
    )

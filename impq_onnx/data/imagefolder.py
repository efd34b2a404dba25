"""Images on disk: the ImageFolder layout ``DIR/<class>/*.png`` and a flat folder of unlabeled images.

Scanning lists and sorts file names only; images are decoded with Pillow when a batch asks for them.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from impq_onnx.data.preprocess import Preprocess, fit_image
from impq_onnx.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderScan", "ImageFiles", "scan_image_folder", "first_image_size"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass(frozen=True)
class ImageFolderScan:
    """What a folder holds: file paths, one label each (-1 when unlabeled), and the class names."""

    paths: tuple[Path, ...]
    labels: np.ndarray
    classes: tuple[str, ...]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder``, sorted by relative path; hidden folders are skipped."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if _is_image(f))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def first_image_size(root: str | os.PathLike) -> tuple[int, int] | None:
    """``(height, width)`` of the first image of an image folder (header only), or None (no folder or image)."""
    root = Path(root)
    if not root.is_dir():
        return None
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d.name for d in _class_order(Path(dirpath), [Path(dirpath) / d for d in dirnames
                                                                      if not d.startswith(".")])]
        for name in sorted(f for f in filenames if _is_image(f)):
            try:
                with Image.open(Path(dirpath) / name) as image:
                    return image.height, image.width
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                continue
    return None


def _class_order(root: Path, dirs: list[Path]) -> list[Path]:
    """Class folders by name, or by number when every name is a distinct integer (``0 90 180 270``,
    ``0 .. 11``: exporters number classes, and string order would put 10 before 2); said once when
    the two orders differ."""
    by_name = sorted(dirs)
    try:
        numbers = [int(p.name) for p in by_name]
    except ValueError:
        return by_name
    if len(set(numbers)) != len(numbers):
        logger.warning("%s: class folders %s name the same number twice; ordered as text", root,
                       ", ".join(p.name for p in by_name))
        return by_name
    by_number = [p for _, p in sorted(zip(numbers, by_name))]
    if by_number != by_name:
        logger.warning("%s: class folders are numbers, ordered numerically (%s = labels 0..%d)", root,
                       " ".join(p.name for p in by_number), len(by_number) - 1)
    return by_number


def scan_image_folder(root: Path, limit_per_class: int | None = None) -> ImageFolderScan:
    """List ``root/<class>/...`` images (classes sorted by name, or by number), or ``root/*`` images as unlabeled.

    A class folder without images keeps its name (and so the label numbering of the others) but
    contributes no samples, with a warning.
    """
    class_dirs = _class_order(root, [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")])
    loose = sorted(p for p in root.iterdir() if p.is_file() and _is_image(p.name))
    paths: list[Path] = []
    labels: list[int] = []
    per_class = {d.name: _images_under(d)[:limit_per_class] for d in class_dirs}
    if any(per_class.values()):
        if loose:
            logger.warning("%s: ignoring %d image(s) outside the class folders", root, len(loose))
        for label, (name, files) in enumerate(per_class.items()):
            if not files:
                logger.warning("%s: class folder %r has no images (%s)", root, name, "/".join(IMAGE_EXTENSIONS))
            paths.extend(files)
            labels.extend([label] * len(files))
        return ImageFolderScan(tuple(paths), np.asarray(labels, np.int64), tuple(per_class))
    if loose:
        loose = loose[:limit_per_class]
        return ImageFolderScan(tuple(loose), np.full(len(loose), -1, np.int64), ())
    raise DataError(
        f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files in {root}/<class>/); "
        "point --data at a folder with one subfolder of images per class"
    )


class ImageFiles:
    """A pixel source that decodes image files on demand, optionally on a few threads."""

    def __init__(self, paths: tuple[Path, ...], workers: int = 1):
        self.paths = paths
        self.workers = max(1, int(workers))

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, item: int) -> str:
        return str(self.paths[item])

    def _decode(self, path: Path, preprocess: Preprocess) -> np.ndarray:
        try:
            with Image.open(path) as image:
                image.load()
                return fit_image(image, preprocess)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{path}: cannot decode the image ({err}); replace or delete the file") from None

    def pixels(self, items: np.ndarray, preprocess: Preprocess) -> np.ndarray:
        """Decoded ``uint8 [B, H, W, C]`` pixels of the given items, in the order given."""
        paths = [self.paths[i] for i in items]
        if self.workers > 1 and len(paths) > 1:
            # map keeps the input order, so the batch is the same whatever the thread timing.
            with ThreadPoolExecutor(self.workers) as pool:
                decoded = list(pool.map(lambda p: self._decode(p, preprocess), paths))
        else:
            decoded = [self._decode(p, preprocess) for p in paths]
        h, w = preprocess.size
        if not decoded:
            return np.zeros((0, h, w, preprocess.num_channels), np.uint8)
        return np.stack(decoded)

"""Images held in a NumPy ``.npz`` file: array ``x`` of images and an optional array ``y`` of labels.

``x`` may be ``[N, H, W]`` (grayscale), ``[N, H, W, C]`` or ``[N, C, H, W]`` with C 1 or 3;
``uint8`` values are read as [0, 255] and float values as [0, 1].
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from impq_onnx.data.limits import check_npz_headers, open_regular, shown
from impq_onnx.data.preprocess import Preprocess, fit_image
from impq_onnx.errors import DataError

__all__ = ["NpzContents", "ArrayImages", "load_npz", "channels_last"]

# ITU-R 601-2 luma, the weights Pillow's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class NpzContents:
    images: np.ndarray  # [N, H, W, C], uint8 or float32
    labels: np.ndarray  # int64, -1 where unlabeled
    classes: tuple[str, ...]


def channels_last(x: np.ndarray, source: str | Path, what: str = "array 'x'") -> np.ndarray:
    """``x`` as ``[N, H, W, C]``; a DataError naming ``source`` for any other shape."""
    if x.ndim == 3:
        return x[..., None]
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        return x
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x.transpose(0, 2, 3, 1)
    raise DataError(
        f"{source}: {what} has shape {list(x.shape)}; expected [N, H, W], [N, H, W, C] or [N, C, H, W] "
        "with C = 1 or 3"
    )


def check_finite(images: np.ndarray, source: str | Path, what: str = "array 'x'") -> None:
    """A DataError naming ``source`` and the first image when float ``images`` hold a NaN or an infinity (they
    would flow through every layer and score as one class, with no error anywhere)."""
    if images.dtype == np.uint8:
        return
    for start in range(0, len(images), 256):  # in chunks: no mask the size of the whole array
        chunk = images[start:start + 256]
        bad = ~np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)
        if bad.any():
            first = start + int(np.argmax(bad))
            raise DataError(f"{shown(source)}: {what} holds NaN or infinite values (image {first}); replace "
                            "them with pixel values")


def load_npz(path: Path) -> NpzContents:
    """Read and check ``x`` and ``y``; the whole file is loaded (npz arrays cannot be memory-mapped), after
    their headers were checked against :data:`impq_onnx.data.limits.MAX_ARRAY_BYTES`."""
    # One descriptor for the checks and the load: a FIFO or device named *.npz is refused, not waited on.
    with open_regular(path, 2**62, ".npz file") as file:
        check_npz_headers(path, file)
        file.seek(0)
        try:
            with np.load(file, allow_pickle=False) as archive:
                if "x" not in archive.files:
                    raise DataError(
                        f"{shown(path)}: no array named 'x' (found {', '.join(archive.files) or 'none'}); "
                        "save images as np.savez(path, x=images, y=labels)"
                    )
                x = archive["x"]
                y = archive["y"] if "y" in archive.files else None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise DataError(f"{shown(path)}: cannot read the .npz file ({err})") from err
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: array 'x' has dtype {x.dtype}; use uint8 (0-255) or float (0-1)")
    images = channels_last(x, path)
    if images.dtype != np.uint8:
        images = images.astype(np.float32, copy=False)
    check_finite(images, path)
    if y is None:
        return NpzContents(images, np.full(len(images), -1, np.int64), ())
    y = np.asarray(y).reshape(-1)
    if len(y) != len(images) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{path}: array 'y' must hold one integer label per image ({len(images)}), "
            f"got {y.dtype} of length {len(y)}"
        )
    if len(y) and y.dtype.kind == "u" and int(y.max()) > np.iinfo(np.int64).max:
        raise DataError(f"{shown(path)}: array 'y' has labels past 2**63 (dtype {y.dtype}); use 0..K-1")
    labels = y.astype(np.int64)
    if len(labels) and labels.min() < 0:
        raise DataError(f"{path}: array 'y' has negative labels; use 0..K-1")
    count = int(labels.max()) + 1 if len(labels) else 0
    return NpzContents(images, labels, tuple(str(i) for i in range(count)))


def npz_image_size(path: Path) -> tuple[int, int] | None:
    """``(height, width)`` of the images in ``path``'s array ``x`` (read from its header only), or None."""
    try:  # open_regular: a FIFO named *.npz in a data folder would block the run
        with open_regular(path, 2**62, ".npz file") as file, zipfile.ZipFile(file) as archive, \
                archive.open("x.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape = read_header(member)[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError, DataError):
        return None
    if len(shape) == 3:
        return int(shape[1]), int(shape[2])
    if len(shape) == 4:  # [N, C, H, W] with C = 1 or 3, else [N, H, W, C]
        return (int(shape[2]), int(shape[3])) if shape[1] in (1, 3) and shape[3] not in (1, 3) else \
            (int(shape[1]), int(shape[2]))
    return None


class ArrayImages:
    """A pixel source over an in-memory image array ``[N, H, W, C]``."""

    def __init__(self, images: np.ndarray, name: str = "array"):
        self.images = images
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, item: int) -> str:
        return f"{self.name}[{item}]"

    def pixels(self, items: np.ndarray, preprocess: Preprocess) -> np.ndarray:
        """``[B, H, W, C]`` pixels at the model size and channel count (uint8 or float32 in [0, 1])."""
        batch = self.images[np.asarray(items, np.int64)]
        if batch.shape[1:3] != preprocess.size:
            return self._through_pillow(batch, preprocess)
        have, want = batch.shape[-1], preprocess.num_channels
        if have == want:
            return batch
        if want == 3:
            return np.repeat(batch, 3, axis=-1)
        luma = batch.astype(np.float32) @ _LUMA
        if batch.dtype == np.uint8:
            return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
        return luma[..., None]

    @staticmethod
    def _through_pillow(batch: np.ndarray, preprocess: Preprocess) -> np.ndarray:
        """Resize like image files are resized, so an npz and a folder of the same images agree."""
        if batch.dtype != np.uint8:
            batch = np.clip(np.rint(batch * 255.0), 0, 255).astype(np.uint8)
        fitted = [fit_image(Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img), preprocess) for img in batch]
        h, w = preprocess.size
        return np.stack(fitted) if fitted else np.zeros((0, h, w, preprocess.num_channels), np.uint8)

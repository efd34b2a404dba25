"""What the tool agrees to read as image data: regular files within size, pixel and array limits.

Every limit is checked before the expensive step it protects, and a file over it is a one-line
:class:`~impq_onnx.errors.DataError` naming it:

- ``MAX_IMAGE_BYTES``: an image file's size, checked on the open descriptor before decoding;
- ``MAX_IMAGE_PIXELS``: width x height from the image header, checked before the pixels are decoded
  (below Pillow's own decompression-bomb threshold, so Pillow never warns about an image we accept);
- ``MAX_ARRAY_BYTES``: an ``.npz`` array's size as its ``.npy`` header declares it, checked before the
  array is read; the header must also agree with the stored member's size;
- ``MAX_SAMPLE_PIXELS``: one preprocessed model-input sample (height x width).

Files are opened with ``O_NONBLOCK`` and checked with ``fstat`` on the open descriptor, so a FIFO, a
device or a directory named ``*.png`` is refused instead of blocking the run, even if it replaced a
regular file after the scan.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from impq_onnx.errors import DataError
from impq_onnx.files import open_input, shown

__all__ = ["MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "MAX_ARRAY_BYTES", "MAX_SAMPLE_PIXELS", "open_regular",
           "open_image", "check_image", "check_npz_headers", "shown"]

MAX_IMAGE_BYTES = 256 * 2**20
MAX_IMAGE_PIXELS = 2**26  # 8192 x 8192
MAX_ARRAY_BYTES = 16 * 2**30
MAX_SAMPLE_PIXELS = 2**24  # 4096 x 4096: one float32 RGB sample is then 192 MiB


def open_regular(path: Path, limit: int, what: str) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file of at most ``limit`` bytes; never blocks
    (:func:`impq_onnx.files.open_input`, a :class:`DataError` otherwise)."""
    return open_input(path, limit, what, DataError, hint="remove it or point the data elsewhere")


def open_image(path: Path, file: BinaryIO) -> Image.Image:
    """Pillow's lazy image over ``file``; the header is read and its pixel count checked, nothing decoded."""
    try:
        image = Image.open(file)
    except UnidentifiedImageError as exc:
        raise DataError(f"{shown(path)}: cannot decode the image (not a format Pillow reads, or a damaged header); "
                        "replace or delete the file") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{shown(path)}: cannot decode the image ({err}); replace or delete the file") from err
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise DataError(f"{shown(path)}: {width}x{height} pixels is over the {MAX_IMAGE_PIXELS} pixel limit; "
                        "shrink or delete the image")
    return image


def check_image(path: Path) -> None:
    """Decode ``path`` cheaply enough to run over every image before a search: JPEG at 1/8 scale, PNG by
    its chunk checksums, anything else fully. Raises a one-line DataError for a file that will not decode."""
    with open_regular(path, MAX_IMAGE_BYTES, "image file") as file, open_image(path, file) as image:
        try:
            if image.format == "PNG":
                image.verify()  # every chunk's CRC through IEND: catches truncation and corruption
            else:
                if image.format == "JPEG":
                    image.draft(image.mode, (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
                image.load()
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
            raise DataError(f"{shown(path)}: cannot decode the image ({err}); replace or delete the file") from err


def _npy_header(member: BinaryIO) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset from an ``.npy`` header (versions 1.0 and 2.0, as ``np.savez`` writes)."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported; save with np.savez")
    return tuple(int(d) for d in shape), np.dtype(dtype), member.tell()


def check_npz_headers(path: Path, file: BinaryIO, names: tuple[str, ...] = ("x", "y")) -> None:
    """Read only the ``.npy`` headers of ``names`` in the ``.npz`` ``file`` (read from ``path``); refuse arrays
    over ``MAX_ARRAY_BYTES`` and headers that promise more data than the archive member holds."""
    try:
        with zipfile.ZipFile(file) as archive:
            members = {info.filename: info for info in archive.infolist()}
            for name in names:
                info = members.get(f"{name}.npy")
                if info is None:
                    continue
                with archive.open(info) as member:
                    shape, dtype, offset = _npy_header(member)  # type: ignore[arg-type]
                if dtype.hasobject:
                    raise DataError(f"{shown(path)}: array '{name}' holds Python objects; save plain numbers")
                nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if nbytes > MAX_ARRAY_BYTES:
                    raise DataError(f"{shown(path)}: array '{name}' {list(shape)} {dtype} claims {nbytes / 2**30:.1f} "
                                    f"GiB, over the {MAX_ARRAY_BYTES // 2**30} GiB limit; split it into smaller files")
                if info.file_size < offset + nbytes:
                    raise DataError(f"{shown(path)}: array '{name}' header claims {nbytes} bytes, the file holds "
                                    f"{max(0, info.file_size - offset)}; the .npz is damaged")
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{shown(path)}: cannot read the .npz file ({err})") from err

"""Decode once per run: an image folder's pixels, decoded and fitted to the model size, as one uint8 array.

:func:`decode_once` decodes every file of an :class:`~impq_onnx.data.imagefolder.ImageFiles` source once
(on ``threads`` threads; Pillow decodes without the GIL) into ``uint8 [N, H, W, C]`` at the model size,
and returns a :class:`DecodedImages` pixel source that serves batches from that array: an epoch then
costs an index and a copy, not N JPEG decodes. Decoding every image is also the check that each one
decodes (the first failure in file order is a one-line DataError naming it), so it replaces
:func:`~impq_onnx.data.imagefolder.check_images`.

With a ``cache_dir`` (``compress`` uses ``<work dir>/decoded``) the array is an ``.npy`` file there,
memory-mapped, reused by every later run (a resume, a rerun) whose key matches. The key is a digest
of the fitting recipe (size, resize, channel mode: what :func:`~impq_onnx.data.preprocess.fit_image`
reads; normalisation and layout are applied per batch and are not part of it) and of every file's
path, size and modification time (nanoseconds): a changed, added, removed or renamed image, or another
recipe, gives another key, so a stale file is never read (it is removed when its replacement is
written). The file is written like every output: to a temporary name in the same folder, flushed,
fsync'ed and moved into place, so a killed run leaves a complete cache file or none. It is never
written inside the data folder (compress checks that the work dir is not in it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from impq_onnx.data.imagefolder import ImageFiles
from impq_onnx.data.preprocess import Preprocess

__all__ = ["DecodedImages", "decode_once", "cache_key", "CACHE_VERSION", "MAX_CACHE_BYTES", "MAX_MEMORY_BYTES"]

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
MAX_CACHE_BYTES = 16 << 30  # a bigger decoded set stays decoded on demand (ImageNet at 224 px is ~190 GB)
MAX_MEMORY_BYTES = 1 << 30  # without a cache folder the array lives in memory: at most this much
_CHUNK = 1024  # images decoded per pool round (bounds the pending futures)


def _fit_recipe(preprocess: Preprocess) -> tuple:
    """What fit_image reads from the recipe: the decoded pixels are the same whenever this is."""
    return (tuple(preprocess.size), preprocess.resize, "L" if preprocess.channels == "L" else "RGB")


def cache_key(paths: tuple[Path, ...], preprocess: Preprocess) -> str:
    """A digest of the fitting recipe and of every file's path, size and mtime (see the module docstring)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": CACHE_VERSION, "recipe": _fit_recipe(preprocess)}).encode())
    for path in paths:
        info = os.stat(path)
        digest.update(os.fsencode(os.path.abspath(path)) + b"\0")
        digest.update(f"{info.st_size}/{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class DecodedImages:
    """A pixel source over decoded pixels (an array or a memory-mapped ``.npy``) of an ImageFiles source.

    A batch under another fitting recipe (``Dataset.with_preprocess``) is decoded from the files."""

    def __init__(self, files: ImageFiles, pixels: np.ndarray, preprocess: Preprocess, path: Path | None = None):
        self.files, self.array, self.recipe, self.path = files, pixels, _fit_recipe(preprocess), path

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, item: int) -> str:
        return self.files.describe(item)

    def pixels(self, items: np.ndarray, preprocess: Preprocess) -> np.ndarray:
        if _fit_recipe(preprocess) != self.recipe:
            return self.files.pixels(items, preprocess)
        return np.array(self.array[np.asarray(items, np.int64)], np.uint8)


def _decode_into(out: np.ndarray, files: ImageFiles, preprocess: Preprocess, threads: int) -> None:
    decode = files.decode_one(preprocess)
    if threads > 1 and len(files) > 1:
        with ThreadPoolExecutor(threads, thread_name_prefix="impq-decode") as pool:
            for start in range(0, len(files), _CHUNK):
                for offset, pixels in enumerate(pool.map(decode, files.paths[start : start + _CHUNK])):
                    out[start + offset] = pixels  # map yields in file order: the first failure is the first file
    else:
        for index, path in enumerate(files.paths):
            out[index] = decode(path)


def _stem(files: ImageFiles) -> str:
    """The cache file prefix of one image folder (its files' common folder): a new key replaces the old file."""
    common = os.path.commonpath([os.path.abspath(p) for p in files.paths]) if files.paths else ""
    return "decoded-" + hashlib.sha256(os.fsencode(common)).hexdigest()[:12]


def decode_once(files: ImageFiles, preprocess: Preprocess, cache_dir: str | os.PathLike | None = None,
                threads: int = 1) -> DecodedImages | None:
    """Every image of ``files`` decoded once (see the module docstring); None when the decoded set would be
    larger than MAX_CACHE_BYTES (MAX_MEMORY_BYTES without ``cache_dir``): the caller then decodes on demand."""
    h, w = preprocess.size
    shape = (len(files), h, w, preprocess.num_channels)
    nbytes = int(np.prod(shape))
    if nbytes > (MAX_CACHE_BYTES if cache_dir is not None else MAX_MEMORY_BYTES):
        return None
    if cache_dir is None:
        pixels = np.empty(shape, np.uint8)
        _decode_into(pixels, files, preprocess, threads)
        return DecodedImages(files, pixels, preprocess)
    folder = Path(cache_dir)
    stem = _stem(files)
    path = folder / f"{stem}-{cache_key(files.paths, preprocess)[:32]}.npy"
    if path.is_file():
        try:
            cached = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:  # damaged: decode again and replace it
            logger.warning("%s: unreadable decoded-image cache (%s); decoding again", path, exc)
        else:
            if cached.shape == shape and cached.dtype == np.uint8:
                return DecodedImages(files, cached, preprocess, path)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # removed again if decoding fails
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        _decode_into(out, files, preprocess, threads)
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        for made in created:  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                made.rmdir()
        raise
    for stale in folder.glob(f"{stem}-*.npy"):  # the same folder under an older key: never read again
        if stale != path:
            with contextlib.suppress(OSError):
                stale.unlink()
    return DecodedImages(files, np.load(path, mmap_mode="r", allow_pickle=False), preprocess, path)

"""A labelled list of images plus the preprocessing that turns them into model input.

A :class:`Dataset` holds indices into a pixel source (image files or an in-memory array), never
decoded images: :meth:`Dataset.batches` decodes one batch at a time, so memory stays bounded by
the batch size whatever the dataset size. Shuffling and augmentation draw from one
``numpy.random.Generator`` seeded by the caller, so a given seed always yields the same batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from impq_onnx.data.preprocess import Preprocess, to_model_input
from impq_onnx.errors import DataError

__all__ = ["PixelSource", "Dataset", "AUGMENT_PADDING", "random_crop_flip", "derive_seed"]

AUGMENT_PADDING = 4  # pixels of zero padding before the random crop (the CIFAR recipe)


def derive_seed(seed: int, iteration: int, purpose: str, extra: int = 0) -> int:
    """A 31-bit seed that depends only on its arguments (never on the process or the clock)."""
    digest = hashlib.sha256(f"{seed}/{iteration}/{purpose}/{extra}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class PixelSource(Protocol):
    """Where pixels come from: decoded ``[B, H, W, C]`` arrays at the model size, RGB or L order."""

    def __len__(self) -> int: ...

    def describe(self, item: int) -> str: ...

    def pixels(self, items: np.ndarray, preprocess: Preprocess) -> np.ndarray: ...


def random_crop_flip(pixels: np.ndarray, rng: np.random.Generator, padding: int = AUGMENT_PADDING) -> np.ndarray:
    """Zero-pad by ``padding``, crop back to size at a random offset, flip half horizontally."""
    b, h, w, _ = pixels.shape
    padded = np.pad(pixels, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = rng.integers(0, 2 * padding + 1, size=(b, 2))
    flips = rng.random(b) < 0.5
    out = np.empty_like(pixels)
    for i, ((top, left), flip) in enumerate(zip(offsets, flips)):
        crop = padded[i, top : top + h, left : left + w]
        out[i] = crop[:, ::-1] if flip else crop
    return out


class Dataset:
    """Samples (items of a pixel source), their labels, the class names and the preprocessing."""

    def __init__(
        self,
        source: PixelSource,
        labels: np.ndarray,
        classes: Sequence[str],
        preprocess: Preprocess,
        items: np.ndarray | None = None,
        name: str = "dataset",
    ) -> None:
        self.source = source
        self.items = np.arange(len(source), dtype=np.int64) if items is None else np.asarray(items, np.int64)
        self.labels = np.asarray(labels, np.int64)
        if len(self.labels) != len(self.items):
            raise ValueError(f"{len(self.labels)} labels for {len(self.items)} samples")
        self.classes = tuple(classes)
        self.preprocess = preprocess
        self.name = name

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, {len(self)} samples, {len(self.classes)} classes)"

    @property
    def labelled(self) -> bool:
        """True when every sample has a label (so training can use them instead of distillation)."""
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.preprocess.sample_shape

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from (a file path or ``file.npz[i]``), for messages."""
        return self.source.describe(int(self.items[index]))

    def with_preprocess(self, preprocess: Preprocess) -> Dataset:
        return Dataset(self.source, self.labels, self.classes, preprocess, self.items, self.name)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Dataset:
        """The samples at ``indices`` (positions in this dataset), in that order."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if len(indices) and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"subset index out of range for a dataset of {len(self)} samples")
        return Dataset(self.source, self.labels[indices], self.classes, self.preprocess, self.items[indices], self.name)

    def split(self, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
        """``(train, val)``: a deterministic split with ``round(n_c * val_fraction)`` of each class in val.

        Unlabeled samples form one group of their own. Both parts keep this dataset's order.
        """
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"validation fraction {val_fraction} must be between 0 and 1 (exclusive)")
        rng = np.random.default_rng(seed)
        val_mask = np.zeros(len(self), bool)
        for label in np.unique(self.labels):
            members = np.flatnonzero(self.labels == label)
            val_mask[rng.permutation(members)[: round(len(members) * val_fraction)]] = True
        if not val_mask.any() or val_mask.all():
            raise DataError(
                f"{self.name}: {len(self)} samples are too few to hold out a fraction {val_fraction} "
                "for validation; add images or change the fraction"
            )
        return self.subset(np.flatnonzero(~val_mask)), self.subset(np.flatnonzero(val_mask))

    def split_any_class(self, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
        """``(train, val)`` with ``round(n * val_fraction)`` samples (at least 1, at most n - 1) held out at
        random whatever their class: for sets too small to hold out part of every class (one image per
        class). Needs at least 2 samples; both parts keep this dataset's order."""
        if len(self) < 2:
            raise DataError(f"{self.name}: {len(self)} sample cannot be split for validation")
        count = min(len(self) - 1, max(1, round(len(self) * val_fraction)))
        chosen = np.random.default_rng(seed).permutation(len(self))[:count]
        val_mask = np.zeros(len(self), bool)
        val_mask[chosen] = True
        return self.subset(np.flatnonzero(~val_mask)), self.subset(np.flatnonzero(val_mask))

    def load(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Model input (float32, model layout) for the samples at ``indices``."""
        items = self.items[np.asarray(indices, np.int64)]
        return to_model_input(self.source.pixels(items, self.preprocess), self.preprocess)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        augment: bool = False,
        drop_last: bool = False,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(x, y)``: float32 model input in the model layout and int64 labels (-1: unlabeled).

        ``augment`` applies the CIFAR recipe (4-pixel zero padding, random crop, horizontal flip) to the
        pixels before normalisation. Shuffling and augmentation are fixed by ``seed``: pass a different
        seed per epoch for different orders.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self)) if shuffle else np.arange(len(self))
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, stop, batch_size):
            chosen = order[start : start + batch_size]
            pixels = self.source.pixels(self.items[chosen], self.preprocess)
            if augment:
                pixels = random_crop_flip(pixels, rng)
            yield to_model_input(pixels, self.preprocess), self.labels[chosen]

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

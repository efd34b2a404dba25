"""Opening a user's data for a given model: preprocessing, folder layout, splits and fit checks.

:func:`open_model_data` is the one way every command (compress, evaluate, sensitivity, verify) and the
bench scripts open ``--data``. Users point it at one ImageFolder tree (or an ``.npz``), or at a folder
holding ``train/`` and ``test/`` (or ``val/``, ``validation/``) trees, or ``train/``, ``val/`` and
``test/``, as CIFAR-10 and ImageNet are usually kept. Every dataset it opens is checked against the
model once, when it is first used: the class count must match the model's logits and the preprocessed
image must fit the model input, with a one-line :class:`~impq_onnx.errors.DataError` naming the data
and the model instead of a failure deep inside onnxruntime.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from impq_onnx.config import suggest
from impq_onnx.data.dataset import Dataset, derive_seed
from impq_onnx.data.preprocess import PRESETS, Preprocess, infer_preprocess, preprocess_from_yaml
from impq_onnx.errors import ConfigError, DataError

if TYPE_CHECKING:
    from impq_onnx.frontend.canonical import CanonicalModel

__all__ = ["ModelData", "open_model_data", "resolve_preprocess", "split_folders", "check_fits"]

EVAL_FOLDERS = ("test", "val", "validation")


def resolve_preprocess(canonical: CanonicalModel, preprocess: str | Preprocess | None = None,
                       data: str | Path | None = None) -> Preprocess:
    """A preset name, a YAML file path, a ready Preprocess, or None (inferred from the model input; a
    dynamic height/width takes the size of the first image under ``data``)."""
    if isinstance(preprocess, Preprocess):
        return preprocess
    if preprocess is None:
        from impq_onnx.data.imagefolder import first_image_size

        layout = canonical.input_layout if canonical.input_layout in ("NCHW", "NHWC") else None
        return infer_preprocess(canonical.input_shape(), layout,
                                first_image_size(data) if data is not None and _dynamic_hw(canonical) else None)
    if preprocess in PRESETS:
        return PRESETS[preprocess]
    if Path(preprocess).suffix.lower() in (".yaml", ".yml") or Path(preprocess).is_file():
        return preprocess_from_yaml(preprocess)
    raise ConfigError(f"option 'preprocess': {preprocess!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                      f"nor a YAML file{suggest(preprocess, PRESETS)}")


def _dynamic_hw(canonical: CanonicalModel) -> bool:
    return any(not isinstance(d, int) for d in canonical.input_shape()[1:])


def split_folders(path: str | Path) -> tuple[Path, Path | None]:
    """``(train, eval)`` folders: ``path/train`` and ``path/test|val|validation`` when both exist, else
    ``(path, None)``."""
    path = Path(path)
    if path.is_dir() and (path / "train").is_dir():
        for name in EVAL_FOLDERS:
            if (path / name).is_dir():
                return path / "train", path / name
    return path, None


def check_fits(canonical: CanonicalModel, dataset: Dataset) -> None:
    """A :class:`DataError` naming the data and the model when the images or the classes do not fit it."""
    shape = canonical.input_shape()
    sample = tuple(dataset.sample_shape)
    for axis, (want, got) in enumerate(zip(shape[1:], sample), start=1):
        if isinstance(want, int) and want != got:
            raise DataError(
                f"{dataset.name}: preprocessed images have shape {list(sample)}, the input "
                f"'{canonical.input_name}' of {canonical.label} needs {list(shape[1:])} (axis {axis}); "
                "set --preprocess size/layout"
            )
    logits = canonical.model.graph.outputs[0].shape
    classes = logits[-1] if logits is not None and len(logits) >= 2 else None
    if isinstance(classes, int) and dataset.classes and len(dataset.classes) != classes:
        raise DataError(
            f"{dataset.name}: {len(dataset.classes)} class folders, but {canonical.label} has {classes} outputs; "
            "point --data at a folder with one subfolder per model class"
        )


@dataclasses.dataclass(frozen=True)
class ModelData:
    """The user's data for one model: which folder plays which part, and the datasets.

    Each dataset is opened (its folder scanned) and checked against the model on first use, so a
    command reads only the folders it needs.
    """

    model: CanonicalModel
    preprocess: Preprocess
    train_dir: Path  # the training images (the whole tree when there are no split folders)
    val_dir: Path | None  # a val/ folder used as it is (beside train/ and test/); else val is held out of train
    test_dir: Path | None
    val_fraction: float = 0.2
    seed: int = 0
    max_val_samples: int | None = None
    limit_per_class: int | None = None
    workers: int = 1
    check: bool = True
    decode: bool = False
    cache_dir: Path | None = None

    def _open(self, path: Path) -> Dataset:
        from impq_onnx.data import open_dataset

        decode = self.decode or self.cache_dir is not None
        dataset = open_dataset(path, self.preprocess, limit_per_class=self.limit_per_class, workers=self.workers,
                               check=self.check and not decode)
        check_fits(self.model, dataset)  # before decoding anything: a wrong folder is an error at once
        if decode:
            from impq_onnx.data import decoded_dataset

            dataset = decoded_dataset(dataset, self.cache_dir, self.check)
        return dataset

    @functools.cached_property
    def train_all(self) -> Dataset:
        """Every image of the training folder, before the validation hold-out (sensitivity measures on it)."""
        return self._open(self.train_dir)

    @functools.cached_property
    def _train_val(self) -> tuple[Dataset, Dataset]:
        if self.val_dir is not None:
            train, val = self.train_all, self._open(self.val_dir)
        else:
            train, val = self.train_all.split(self.val_fraction, self.seed)
        if self.max_val_samples is not None and len(val) > self.max_val_samples:
            # A seeded subset in the split's order: ImageFolder splits are sorted by class.
            chosen = np.random.default_rng(derive_seed(self.seed, 0, "validation")).permutation(len(val))
            val = val.subset(np.sort(chosen[: self.max_val_samples]))
        return train, val

    @property
    def train(self) -> Dataset:
        """The images compress fine-tunes on: the training folder less the validation hold-out."""
        return self._train_val[0]

    @property
    def val(self) -> Dataset:
        """``val/`` beside ``train/`` and ``test/``; else ``val_fraction`` of each class of the training folder
        (seeded), at most ``max_val_samples`` of them."""
        return self._train_val[1]

    @functools.cached_property
    def test(self) -> Dataset | None:
        """The held-out folder (``test/``, ``val/`` or ``validation/`` beside ``train/``), or None."""
        return self._open(self.test_dir) if self.test_dir is not None else None

    @property
    def evaluation(self) -> Dataset:
        """The test split when the data has one, else every training image (evaluate and verify use it)."""
        return self.test if self.test is not None else self.train_all


def open_model_data(model: CanonicalModel, data: str | Path, preprocess: str | Preprocess | None = None, *,
                    val_fraction: float = 0.2, seed: int = 0, max_val_samples: int | None = None,
                    limit_per_class: int | None = None, workers: int = 1, check: bool = True,
                    decode: bool = False, cache_dir: str | Path | None = None) -> ModelData:
    """``data`` opened for ``model``: the preprocessing resolved and the folders assigned to their parts.

    ``train/``, ``val/`` and ``test/`` subfolders: each as it is (``val_fraction`` unused). ``train/``
    and ``test/`` (or ``val/``, ``validation/``): the second is the test split and ``val_fraction`` of
    ``train/`` is held out for validation. Anything else: one tree, split in two, and no test split.
    ``preprocess``: see :func:`resolve_preprocess`; ``limit_per_class``, ``workers``, ``check``,
    ``decode`` and ``cache_dir``: as :func:`~impq_onnx.data.open_dataset` takes them.
    """
    root = Path(data)
    train_dir, held = split_folders(root)
    val_dir = root / "val" if held is not None and (root / "val").is_dir() and (root / "test").is_dir() else None
    test_dir = root / "test" if val_dir is not None else held
    preprocessing = resolve_preprocess(model, preprocess, train_dir)
    return ModelData(model, preprocessing, train_dir, val_dir, test_dir, val_fraction, seed, max_val_samples,
                     limit_per_class, workers, check, decode, None if cache_dir is None else Path(cache_dir))

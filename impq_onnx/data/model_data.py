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
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from impq_onnx.config import suggest
from impq_onnx.data.dataset import Dataset, derive_seed
from impq_onnx.data.in_memory import ArrayData, InMemoryData
from impq_onnx.data.preprocess import PRESETS, Preprocess, infer_preprocess, preprocess_from_yaml
from impq_onnx.errors import ConfigError, DataError

if TYPE_CHECKING:
    from impq_onnx.frontend.canonical import CanonicalModel

logger = logging.getLogger(__name__)

__all__ = ["ModelData", "open_model_data", "resolve_preprocess", "split_folders", "check_fits"]

EVAL_FOLDERS = ("test", "val", "validation")


MODEL_INPUT = "model-input"  # the data is model input already: fed unchanged


def resolve_preprocess(canonical: CanonicalModel, preprocess: str | Preprocess | None = None,
                       data: str | Path | ArrayData | None = None,
                       input_shape: tuple[int, ...] | None = None) -> Preprocess:
    """A preset name, a YAML file path, a ready Preprocess, ``"model-input"`` (float arrays that are model
    input already: no resize, scaling or normalisation), or None (inferred from the model input; a
    dynamic height/width takes ``input_shape`` (``--input-shape``) when given, else the size of the first
    image under ``data``)."""
    if isinstance(preprocess, Preprocess):
        return preprocess
    if preprocess is None or preprocess == MODEL_INPUT:
        layout = canonical.input_layout if canonical.input_layout in ("NCHW", "NHWC") else None
        size = None
        if input_shape is not None and _dynamic_hw(canonical) and len(input_shape) == len(canonical.input_shape()):
            inferred = infer_preprocess((1, *input_shape[1:]), layout)
        else:
            if data is not None and _dynamic_hw(canonical):
                size = (data.images.shape[1], data.images.shape[2]) if isinstance(data, ArrayData) else \
                    _data_image_size(Path(data))
            inferred = infer_preprocess(canonical.input_shape(), layout, size)
        if preprocess is None:
            return inferred
        n = inferred.num_channels
        return inferred.replace(resize=None, mean=(0.0,) * n, std=(1.0,) * n, value_scale=1.0,
                                channels="L" if n == 1 else "RGB")
    if preprocess in PRESETS:
        return PRESETS[preprocess]
    if Path(preprocess).suffix.lower() in (".yaml", ".yml") or Path(preprocess).is_file():
        return preprocess_from_yaml(preprocess)
    raise ConfigError(f"option 'preprocess': {preprocess!r} is neither a preset ({', '.join(sorted(PRESETS))}, "
                      f"{MODEL_INPUT}) nor a YAML file{suggest(preprocess, [*PRESETS, MODEL_INPUT])}")


def _data_image_size(data: Path) -> tuple[int, int] | None:
    """The first image's size: of an image folder, of an ``.npz``'s array ``x``, or of the first ``.npz`` in
    a folder of splits (``train.npz``, ...)."""
    from impq_onnx.data.imagefolder import first_image_size
    from impq_onnx.data.npz import npz_image_size

    if data.is_file() and data.suffix.lower() == ".npz":
        return npz_image_size(data)
    if data.is_dir():
        for found in sorted(data.glob("*.npz")):
            return npz_image_size(found)
    return first_image_size(data)


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


def _output_classes(model: CanonicalModel) -> object:
    """The logits' last dimension (an int when the model declares it, else a name or None)."""
    logits = model.model.graph.outputs[0].shape
    return logits[-1] if logits is not None and len(logits) >= 2 else None


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
    classes = _output_classes(canonical)
    if isinstance(classes, int) and dataset.classes and len(dataset.classes) != classes:
        raise DataError(
            f"{dataset.name}: {len(dataset.classes)} class folders, but {canonical.label} has {classes} outputs; "
            "point --data at a folder with one subfolder per model class"
        )
    if isinstance(classes, int) and len(dataset.labels) and int(dataset.labels.max()) >= classes:
        raise DataError(f"{dataset.name}: label {int(dataset.labels.max())} is out of range for {canonical.label}, "
                        f"which has {classes} outputs; labels must be 0..{classes - 1}")


def _check_class_count(model: CanonicalModel, class_order: tuple[str, ...] | None,
                       given: str | Path | list[str] | tuple[str, ...] | None) -> None:
    """``--classes`` names one class per model output, in its order: a list of another length is a mistake, named
    with its source (the folder count check would blame the data)."""
    if class_order is None:
        return
    outputs = _output_classes(model)
    if isinstance(outputs, int) and len(class_order) != outputs:
        from impq_onnx.data.limits import shown

        where = "option 'classes'"
        if isinstance(given, (str, Path)) and Path(given).is_file():
            where = shown(given)
        raise DataError(f"{where}: {len(class_order)} class names, but {model.label} has {outputs} outputs; give one "
                        "name per output, in the model's output order")


@dataclasses.dataclass(frozen=True)
class ModelData:
    """The user's data for one model: which folder plays which part, and the datasets.

    Each dataset is opened (its folder scanned) and checked against the model on first use, so a
    command reads only the folders it needs.
    """

    model: CanonicalModel
    preprocess: Preprocess
    # Each a folder or .npz path, or the caller's arrays (:mod:`impq_onnx.data.in_memory`).
    train_dir: Path | ArrayData  # the training images (the whole tree when there are no split folders)
    val_dir: Path | ArrayData | None  # a val/ folder used as it is (beside train/ and test/); else held out of train
    test_dir: Path | ArrayData | None
    val_fraction: float = 0.2
    seed: int = 0
    max_val_samples: int | None = None
    limit_per_class: int | None = None
    workers: int = 1
    classes: tuple[str, ...] | None = None  # the model's class order for folder names (--classes)
    check: bool = True
    decode: bool = False
    cache_dir: Path | None = None

    def _open(self, path: Path | ArrayData) -> Dataset:
        from impq_onnx.data import first_per_class, open_dataset
        from impq_onnx.data.npz import ArrayImages

        decode = self.decode or self.cache_dir is not None
        if isinstance(path, ArrayData):
            dataset = Dataset(ArrayImages(path.images, path.name), path.labels, (), self.preprocess, name=path.name)
            if self.limit_per_class is not None:
                dataset = dataset.subset(first_per_class(dataset.labels, self.limit_per_class))
            decode = False
        else:
            dataset = open_dataset(path, self.preprocess, limit_per_class=self.limit_per_class, workers=self.workers,
                                   classes=self.classes, check=self.check and not decode)
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
            train, val = self._held_out()
        if self.max_val_samples is not None and len(val) > self.max_val_samples:
            # A seeded subset in the split's order: ImageFolder splits are sorted by class.
            chosen = np.random.default_rng(derive_seed(self.seed, 0, "validation")).permutation(len(val))
            val = val.subset(np.sort(chosen[: self.max_val_samples]))
        return train, val

    def _held_out(self) -> tuple[Dataset, Dataset]:
        """``val_fraction`` of each class held out; for small calibration sets (one image per class) a
        fraction held out across classes, or, with ``val_fraction`` 0 or a single image, no hold-out at all
        (validation on the training images). Which one is said in one log line."""
        everything = self.train_all
        name, n = everything.name, len(everything)
        if self.val_fraction == 0 or n < 2:
            logger.warning("%s: %s; validation runs on the %d training image(s) themselves (no held-out images: "
                           "accuracy drops are measured on what is fine-tuned on)", name,
                           "val_fraction is 0" if self.val_fraction == 0 else "one image", n)
            return everything, everything
        labels = everything.labels
        per_class = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.array([n])
        stratified = int(np.round(per_class[per_class > 0] * self.val_fraction).sum())
        if stratified >= max(1, round(n * self.val_fraction) // 2):  # else most classes would hold out nothing
            try:
                return everything.split(self.val_fraction, self.seed)
            except DataError:  # every image of the set would be held out
                pass
        train, val = everything.split_any_class(self.val_fraction, self.seed)
        logger.warning("%s: %d image(s), at most %d per class: too few to hold out %g of each class; validating "
                       "on %d image(s) held out across classes (top-1 and agreement with the float model on "
                       "images not fine-tuned on)", name, n, int(per_class.max()), self.val_fraction, len(val))
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


def open_model_data(model: CanonicalModel, data: str | Path | InMemoryData,
                    preprocess: str | Preprocess | None = None, *, val_fraction: float = 0.2, seed: int = 0,
                    max_val_samples: int | None = None, limit_per_class: int | None = None,
                    workers: int = 1, classes: str | Path | list[str] | tuple[str, ...] | None = None,
                    input_shape: tuple[int, ...] | None = None, check: bool = True, decode: bool = False,
                    cache_dir: str | Path | None = None) -> ModelData:
    """``data`` opened for ``model``: the preprocessing resolved and the folders assigned to their parts.

    ``train/``, ``val/`` and ``test/`` subfolders: each as it is (``val_fraction`` unused). ``train/``
    and ``test/`` (or ``val/``, ``validation/``): the second is the test split and ``val_fraction`` of
    ``train/`` is held out for validation. Anything else: one tree, split in two, and no test split.
    ``preprocess``: see :func:`resolve_preprocess`; ``limit_per_class``, ``workers``, ``check``, ``decode``
    and ``cache_dir``: as :func:`~impq_onnx.data.open_dataset` takes them. ``classes``: the model's class
    order, a comma-separated list or a labels file (:func:`~impq_onnx.data.imagefolder.parse_classes`). ``input_shape``
    (``--input-shape``): the size a dynamic-size model is fed at when ``preprocess`` is not given; the
    preprocessed images must have it. ``data`` may also be the caller's arrays
    (:class:`~impq_onnx.data.in_memory.InMemoryData`): its ``train``, ``val`` and ``test`` play the parts of
    the folders of the same names.
    """
    from impq_onnx.data.imagefolder import parse_classes

    class_order = parse_classes(classes)
    _check_class_count(model, class_order, classes)
    if isinstance(data, InMemoryData):
        preprocessing = resolve_preprocess(model, preprocess, data.train, input_shape)
        return ModelData(model, preprocessing, data.train, data.val, data.test, val_fraction, seed, max_val_samples,
                         limit_per_class, workers, class_order)
    root = Path(data)
    train_dir, held = split_folders(root)
    val_dir = root / "val" if held is not None and (root / "val").is_dir() and (root / "test").is_dir() else None
    test_dir = root / "test" if val_dir is not None else held
    preprocessing = resolve_preprocess(model, preprocess, train_dir, input_shape)
    if input_shape is not None and tuple(input_shape[1:]) != tuple(preprocessing.sample_shape):
        raise ConfigError(f"--input-shape {','.join(map(str, input_shape))} does not match the preprocessed images "
                          f"{list(preprocessing.sample_shape)} (per sample); set the preprocess size to match, or "
                          "leave one of them out")
    return ModelData(model, preprocessing, train_dir, val_dir, test_dir, val_fraction, seed, max_val_samples,
                     limit_per_class, workers, class_order, check, decode,
                     None if cache_dir is None else Path(cache_dir))

"""Opening a user's data for a given model: preprocessing, folder layout and fit checks.

Users point ``--data`` at either one ImageFolder tree or at a folder holding ``train/`` and
``test/`` (or ``val/``) trees, as CIFAR-10 and ImageNet are usually kept. The class count must
match the model's logits and the preprocessed image must fit the model input; both are checked
here once, with one-line errors, instead of failing deep inside onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

from impq_onnx.errors import DataError
from impq_onnx.data.dataset import Dataset
from impq_onnx.data.preprocess import PRESETS, Preprocess, infer_preprocess, preprocess_from_yaml

__all__ = ["resolve_preprocess", "split_folders", "open_for_model"]

EVAL_FOLDERS = ("test", "val", "validation")


def resolve_preprocess(canonical, preprocess: str | Preprocess | None = None,
                       data: str | Path | None = None) -> Preprocess:
    """A preset name, a YAML file path, a ready Preprocess, or None (inferred from the input shape; a
    dynamic height/width takes the size of the first image under ``data``)."""
    if isinstance(preprocess, Preprocess):
        return preprocess
    if preprocess is None:
        from impq_onnx.data.imagefolder import first_image_size

        return infer_preprocess(canonical.input_shape(), None if canonical.input_layout == "other" else canonical.input_layout,
                                first_image_size(data) if data is not None and _dynamic_hw(canonical) else None)
    if preprocess in PRESETS:
        return PRESETS[preprocess]
    if Path(preprocess).suffix.lower() in (".yaml", ".yml"):
        return preprocess_from_yaml(preprocess)
    raise DataError(f"--preprocess '{preprocess}' is neither a preset ({', '.join(sorted(PRESETS))}) nor a .yaml file")


def _dynamic_hw(canonical) -> bool:
    return any(not isinstance(d, int) for d in canonical.input_shape()[1:])


def split_folders(path: str | Path) -> tuple[Path, Path | None]:
    """``(train, eval)`` folders: ``path/train`` and ``path/test|val`` when both exist, else ``(path, None)``."""
    path = Path(path)
    if path.is_dir() and (path / "train").is_dir():
        for name in EVAL_FOLDERS:
            if (path / name).is_dir():
                return path / "train", path / name
    return path, None


def open_for_model(canonical, path: str | Path, preprocess: str | Preprocess | None = None,
                   *, limit_per_class: int | None = None) -> Dataset:
    """Open ``path`` with the model's preprocessing and check it fits the model."""
    from impq_onnx.data import open_dataset

    dataset = open_dataset(path, resolve_preprocess(canonical, preprocess, path), limit_per_class=limit_per_class)
    check_fits(canonical, dataset)
    return dataset


def check_fits(canonical, dataset: Dataset) -> None:
    shape = canonical.input_shape()
    sample = tuple(dataset.sample_shape)
    for axis, (want, got) in enumerate(zip(shape[1:], sample), start=1):
        if isinstance(want, int) and want != got:
            raise DataError(
                f"{dataset.name}: preprocessed images have shape {list(sample)}, the model input "
                f"'{canonical.input_name}' needs {list(shape[1:])} (axis {axis}); set --preprocess size/layout"
            )
    logits = canonical.model.graph.outputs[0].shape
    classes = logits[-1] if logits is not None and len(logits) >= 2 else None
    if isinstance(classes, int) and dataset.classes and len(dataset.classes) != classes:
        raise DataError(
            f"{dataset.name}: {len(dataset.classes)} class folders, but the model has {classes} outputs; "
            "point --data at a folder with one subfolder per model class"
        )

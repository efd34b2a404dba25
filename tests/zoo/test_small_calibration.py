"""Issue 24, small calibration sets: one image per class works. Validation is held out across classes
(or, with one image or val_fraction 0, runs on the training images), which is said in one log line;
warnings are summarised, never one line per class folder."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from tiny_models import Quirks, build
from zoo_models import CLASSES, image_folder

from impq_onnx.compression import compress
from impq_onnx.data.model_data import open_model_data
from impq_onnx.frontend.canonical import from_proto


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_one_image_per_class_holds_out_across_classes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = image_folder(tmp_path / "data", per_class=1)
    with caplog.at_level(logging.WARNING):
        model_data = open_model_data(from_proto(build(Quirks())), data, val_fraction=0.2, seed=3)
        train, val = model_data.train, model_data.val
    assert (len(train), len(val)) == (CLASSES - 1, 1)  # was "5 samples are too few to hold out a fraction 0.2"
    assert not set(train.items.tolist()) & set(val.items.tolist())
    lines = _messages(caplog)
    assert len(lines) == 1 and "held out across classes" in lines[0]


def test_enough_images_per_class_keep_the_stratified_split(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    data = image_folder(tmp_path / "data", per_class=5)
    with caplog.at_level(logging.WARNING):
        model_data = open_model_data(from_proto(build(Quirks())), data, val_fraction=0.2)
        val = model_data.val
    assert np.bincount(val.labels).tolist() == [1] * CLASSES
    assert not _messages(caplog)


@pytest.mark.parametrize("per_class,fraction", [(1, 0.0), (3, 0.0)])
def test_no_validation_is_stated(per_class: int, fraction: float, tmp_path: Path,
                                 caplog: pytest.LogCaptureFixture) -> None:
    data = image_folder(tmp_path / "data", per_class=per_class)
    with caplog.at_level(logging.WARNING):
        model_data = open_model_data(from_proto(build(Quirks())), data, val_fraction=fraction)
        assert len(model_data.train) == len(model_data.val) == per_class * CLASSES
    lines = _messages(caplog)
    assert len(lines) == 1 and "validation runs on the" in lines[0]


def test_compress_runs_on_one_image_per_class(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(build(Quirks(softmax=True)), path)
    data = image_folder(tmp_path / "data", per_class=1)
    for i in range(20):  # empty class folders beside the real ones: one summary line, not twenty
        (tmp_path / "data" / f"z{i:02d}").mkdir()
    labels = ",".join([f"c{i}" for i in range(CLASSES)] + [f"z{i:02d}" for i in range(20)])
    with caplog.at_level(logging.WARNING):
        with pytest.raises(Exception, match="25 class folders, but"):
            compress(path, data, output=tmp_path / "bad.onnx", progress=False, report=False)
        with pytest.raises(Exception, match="25 class names, but"):  # a list naming them all: the list is wrong
            compress(path, data, output=tmp_path / "bad.onnx", progress=False, classes=labels, report=False)
    for i in range(20):
        (tmp_path / "data" / f"z{i:02d}").rmdir()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = compress(path, data, output=tmp_path / "out.onnx", progress=False, steps=2, start_steps=2,
                          sensitivity_samples=4, batch_size=4, max_iterations=1, target_bits=None,
                          target_act_bits=None, threads=1, report=False)
    assert (tmp_path / "out.onnx").is_file()
    assert result.iterations and result.final["val_agreement"] is not None and result.reference["n"] == 1
    lines = _messages(caplog)
    assert sum("held out across classes" in line for line in lines) == 1
    assert not [line for line in lines if "has no images" in line]

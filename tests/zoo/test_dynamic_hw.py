"""Issue 24, dynamic height/width: with no --preprocess the images keep the data's size (never a silent
224x224), said in one warning; without data the 224 fallback is said too."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tiny_models import Quirks, build
from zoo_models import image_folder

from impq_onnx.data.model_data import open_model_data, resolve_preprocess
from impq_onnx.frontend.canonical import from_proto


def test_dynamic_hw_takes_the_data_size(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    canonical = from_proto(build(Quirks(dynamic_hw=True)))
    data = image_folder(tmp_path / "data", per_class=2)  # 8x8 images
    with caplog.at_level(logging.WARNING):
        dataset = open_model_data(canonical, data).train_all
    assert dataset.preprocess.size == (8, 8) and dataset.preprocess.resize is None
    assert "images are fed at 8x8, the data's size" in caplog.text


def test_dynamic_hw_without_data_says_224(caplog: pytest.LogCaptureFixture) -> None:
    canonical = from_proto(build(Quirks(dynamic_hw=True)))
    with caplog.at_level(logging.WARNING):
        assert resolve_preprocess(canonical).size == (224, 224)
    assert "cropped to 224x224" in caplog.text


def test_static_hw_ignores_the_data_size(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    canonical = from_proto(build(Quirks()))
    data = image_folder(tmp_path / "data", per_class=1)
    with caplog.at_level(logging.WARNING):
        assert resolve_preprocess(canonical, None, data).size == (8, 8)
    assert "dynamic height/width" not in caplog.text

"""Issue 24, ``--input-shape`` on compress: a dynamic-size model with ``auto_pad`` convs (CNTK-style) goes
through compress at the given size (the images are fed at it), or at the data's size when it is not given;
a size that is a guess (no data size, no option) is said in a warning, never a silent 224."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from tiny_models import Quirks, build
from zoo_models import image_folder

from impq_onnx.cli import main
from impq_onnx.compression import compress
from impq_onnx.errors import ConfigError
from impq_onnx.frontend.canonical import from_proto
from impq_onnx.frontend.site_analysis import find_sites


def _auto_pad_model() -> onnx.ModelProto:
    model = build(Quirks(dynamic_hw=True))
    for node in model.graph.node:
        if node.op_type == "Conv":
            kept = [a for a in node.attribute if a.name != "pads"]
            del node.attribute[:]
            node.attribute.extend(kept + [onnx.helper.make_attribute("auto_pad", "SAME_UPPER")])
    return model


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    path = tmp_path / "autopad.onnx"
    onnx.save(_auto_pad_model(), path)
    return {"model": path, "data": image_folder(tmp_path / "data", per_class=4), "root": tmp_path}  # 8x8 images


def _gbitops(files: dict[str, Path], name: str, *extra: str) -> float:
    out = files["root"] / f"{name}.onnx"
    result = CliRunner().invoke(main, ["compress", str(files["model"]), "--data", str(files["data"]), "--output",
                                       str(out), "--method", "uniform-ptq", "--no-report", "--quiet", *extra],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((files["root"] / f"{name}.report.json").read_text())["final"]["gbitops"]


def test_input_shape_sets_the_size_compress_works_at(files: dict[str, Path]) -> None:
    data_size = _gbitops(files, "data")
    given = _gbitops(files, "given", "--input-shape", "1,3,12,12")
    canonical = from_proto(_auto_pad_model())
    macs = {size: find_sites(canonical, (1, 3, size, size)).total_macs for size in (8, 12)}
    assert given / data_size == pytest.approx(macs[12] / macs[8], rel=1e-3)  # at 12x12, not 8x8 or 224
    assert macs[12] / macs[8] > 2
    written = onnx.load(files["root"] / "given.onnx")
    dims = [d.dim_param or d.dim_value for d in written.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]  # the interface stays dynamic


def test_auto_pad_model_fine_tunes_at_the_given_size(files: dict[str, Path]) -> None:
    result = compress(files["model"], files["data"], output=files["root"] / "impq.onnx", progress=False, steps=2,
                      start_steps=2, sensitivity_samples=8, batch_size=4, max_iterations=1, target_bits=None,
                      target_act_bits=None, threads=1, report=False, input_shape="1,3,12,12")
    assert result.iterations[-1].fine_tune_steps > 0 and np.isfinite(result.iterations[-1].fine_tune_loss)


def test_input_shape_that_contradicts_the_preprocess_is_refused(files: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="does not match the preprocessed images"):
        compress(files["model"], files["data"], output=files["root"] / "x.onnx", progress=False, preprocess="cifar",
                 input_shape="1,3,12,12", report=False)
    with pytest.raises(ConfigError, match="input_shape"):
        compress(files["model"], files["data"], output=files["root"] / "x.onnx", progress=False,
                 input_shape="1,3,twelve,12", report=False)


def test_a_guessed_size_is_said(caplog: pytest.LogCaptureFixture) -> None:
    canonical = from_proto(_auto_pad_model())
    with caplog.at_level(logging.WARNING):
        sites = find_sites(canonical)
    assert sites.input_shape == (1, 3, 224, 224)
    assert any("a guess" in r.getMessage() and "--input-shape" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        find_sites(canonical, (1, 3, 12, 12))
    assert not caplog.records

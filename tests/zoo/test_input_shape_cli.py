"""Issue 24, ``--input-shape`` on every command that analyses the model, and the data's size as the
default for a dynamic height/width model (16x16 images here, not 224)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from tiny_models import Quirks, build
from zoo_models import image_folder

from impq_onnx.cli import main
from impq_onnx.frontend.canonical import load
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.quant.plan import PrecisionPlan


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shape")
    model = root / "dyn.onnx"
    onnx.save(build(Quirks(dynamic_hw=True)), model)
    data = image_folder(root / "data", per_class=3)
    for path in data.rglob("*.png"):  # 16x16 images
        from PIL import Image

        Image.open(path).resize((16, 16)).save(path)
    plan = root / "plan.yaml"
    PrecisionPlan.uniform(find_sites(load(model), (1, 3, 16, 16)), 8, None).save(plan)
    return {"model": model, "data": data, "plan": plan, "root": root}


def _ok(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("shape", [None, "1,3,16,16"])
def test_every_command_takes_the_input_shape(files: dict[str, Path], shape: str | None) -> None:
    m, d, p, root = (str(files[k]) for k in ("model", "data", "plan", "root"))
    given = ["--input-shape", shape] if shape else []
    table = json.loads(_ok("inspect", m, "--json", "--input-shape", shape or "1,3,16,16"))
    assert table["input_shape"] == [1, 3, 16, 16]
    _ok("evaluate", m, "--data", d, "--plan", p, *given)
    _ok("sensitivity", m, "--data", d, "--samples", "8", "-o", f"{root}/sens{bool(shape)}", *given)
    out = f"{root}/low{bool(shape)}.onnx"
    _ok("lower", m, "--plan", p, "-o", out, *(given or ["--input-shape", "1,3,16,16"]))
    _ok("verify", out, "--model", m, "--plan", p, "--data", d, *given)

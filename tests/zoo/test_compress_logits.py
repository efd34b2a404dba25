"""``--logits`` on compress: a model with two classifier heads (an auxiliary head beside the main one, as some
exports carry) cannot have its logits guessed; compress says so in one line naming the option, and with
``--logits NAME`` it compresses that head and writes a model that keeps every output of the original. Before the
option, compress had no way to name the logits and such a model needed hand surgery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from click.testing import CliRunner
from tiny_models import CLASSES, two_heads
from zoo_models import image_folder

from impq_onnx.cli import main


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    path = tmp_path / "heads.onnx"
    onnx.save(two_heads(), path)
    return {"model": path, "data": image_folder(tmp_path / "data", per_class=4), "root": tmp_path}


def _compress(files: dict[str, Path], *extra: str):
    out = files["root"] / "out.onnx"
    return CliRunner().invoke(main, ["compress", str(files["model"]), "--data", str(files["data"]), "--output",
                                     str(out), "--method", "uniform-ptq", "--no-report", "--quiet", *extra])


def test_an_ambiguous_model_is_refused_in_one_line_naming_the_option(files: dict[str, Path]) -> None:
    result = _compress(files)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "2 outputs (logits, aux)" in lines[0] and "--logits NAME" in lines[0]
    assert not (files["root"] / "out.onnx").exists()


@pytest.mark.parametrize("head", ["logits", "aux"])
def test_logits_names_the_head_and_every_output_is_kept(files: dict[str, Path], head: str) -> None:
    result = _compress(files, "--logits", head)
    assert result.exit_code == 0, result.output
    written = files["root"] / "out.onnx"
    assert [o.name for o in onnx.load(written).graph.output] == ["logits", "aux"]
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    got = ort.InferenceSession(str(written)).run(None, {"image": x})
    assert [g.shape for g in got] == [(2, CLASSES), (2, CLASSES)] and all(np.isfinite(g).all() for g in got)
    # the named head is the one quantized: its Gemm is among the plan's weight groups, the other's is not
    weights = yaml.safe_load((files["root"] / "out.plan.yaml").read_text())["weights"]
    heads = {name for name in weights if name in ("fc", "aux")}
    assert heads == {"fc" if head == "logits" else "aux"}
    config = (files["root"] / "out.config.yaml").read_text()
    assert f"logits: {head}" in config


def test_a_logits_name_the_model_lacks_is_one_line(files: dict[str, Path]) -> None:
    result = _compress(files, "--logits", "nope")
    assert result.exit_code == 2 and "no tensor named 'nope'" in result.output
    assert len(result.output.strip().splitlines()) == 1

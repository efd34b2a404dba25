"""The impq-onnx command as a user runs it: a real subprocess, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from tiny_models import Quirks, build


def impq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "impq_onnx", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def tiny_path(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(build(Quirks(softmax=True)), path)
    return path


def test_inspect_prints_a_table_with_totals(tiny_path):
    result = impq("inspect", str(tiny_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{tiny_path}: input image [1,3,8,8], logits logits")
    assert any(line.split()[:2] == ["dwconv", "Conv"] and "dw" in line for line in lines)
    assert any(line.split()[:2] == ["conv1", "Conv"] and "bn1" in line for line in lines)
    assert lines[-1].startswith("3 layers, 164 weights, ")


def test_inspect_json_matches_the_table(tiny_path):
    result = impq("inspect", str(tiny_path), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [layer["name"] for layer in data["layers"]] == ["conv1", "dwconv", "fc"]
    assert data["totals"]["params"] == 108 + 36 + 20
    assert data["totals"]["macs"] == sum(layer["macs"] for layer in data["layers"])
    assert data["layers"][1]["groups"] == 4 and data["layers"][1]["activation_clip"] is not None


@pytest.mark.parametrize(
    "args, expected",
    [
        (["inspect", "{missing}"], "no such model file"),
        (["inspect", "{garbage}"], "not a readable ONNX model"),
        (["inspect", "{tiny}", "--input-shape", "1,3,9,9"], "fixes it to 8"),
        (["inspect", "{tiny}", "--logits", "nope"], "no tensor named 'nope'"),
    ],
)
def test_bad_input_is_one_line_exit_2_no_traceback(tmp_path, tiny_path, args, expected):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not protobuf at all \xff\xff\xff")
    paths = {"missing": tmp_path / "missing.onnx", "garbage": garbage, "tiny": tiny_path}
    result = impq(*[a.format(**paths) for a in args])
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_bad_shape_option_is_a_usage_error(tiny_path):
    result = impq("inspect", str(tiny_path), "--input-shape", "1,3,a,8")
    assert result.returncode == 2 and "comma-separated" in result.stderr


def test_inspect_resnet20_reports_the_published_size(tmp_path):
    from impq_onnx.architectures import resnet20

    path = tmp_path / "resnet20.onnx"
    onnx.save(resnet20(), path)
    result = impq("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    totals = json.loads(result.stdout)["totals"]
    assert 40.5e6 <= totals["macs"] <= 41.0e6  # published: ~41 M
    assert round(totals["params"] / 1e6, 2) == 0.27
    assert totals["layers"] == 20 and totals["activation_sites"] == 20


BUNDLED = Path(__file__).resolve().parents[1] / "models" / "fashion-mnist"


def test_evaluate_lower_verify_on_the_bundled_model(tmp_path):
    from impq_onnx import find_sites, load
    from impq_onnx.quant.plan import PrecisionPlan

    model = BUNDLED / "model.onnx"
    result = impq("evaluate", str(model), "--data", str(BUNDLED), "--json")
    assert result.returncode == 0, result.stderr
    float_eval = json.loads(result.stdout)
    assert float_eval["n"] == 200 and float_eval["top1"] >= 0.8

    sites = find_sites(load(model))
    plan = PrecisionPlan.uniform(sites, 3, None)
    plan.weights["fc"] = [1] * len(plan.weights["fc"])
    plan.save(tmp_path / "plan.yaml")
    out = tmp_path / "out.onnx"
    result = impq("lower", str(model), "--plan", str(tmp_path / "plan.yaml"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.is_file() and (tmp_path / "out.onnx.bits.json").is_file()
    result = impq("verify", str(out), "--model", str(model), "--plan", str(tmp_path / "plan.yaml"),
                  "--data", str(BUNDLED), "--json")
    assert result.returncode == 0, result.stderr
    verdict = json.loads(result.stdout)
    assert verdict["ok"] and verdict["agreement"] == 1.0 and verdict["samples"] == 200

    simulated = impq("evaluate", str(model), "--data", str(BUNDLED), "--plan", str(tmp_path / "plan.yaml"), "--json")
    lowered = impq("evaluate", str(out), "--data", str(BUNDLED), "--json")
    assert json.loads(simulated.stdout)["top1"] == json.loads(lowered.stdout)["top1"]


def test_verify_fails_against_a_different_plan(tmp_path):
    from impq_onnx import find_sites, load
    from impq_onnx.quant.plan import PrecisionPlan

    model = BUNDLED / "model.onnx"
    sites = find_sites(load(model))
    PrecisionPlan.uniform(sites, 4, None).save(tmp_path / "four.yaml")
    PrecisionPlan.uniform(sites, 2, None).save(tmp_path / "two.yaml")
    assert impq("lower", str(model), "--plan", str(tmp_path / "four.yaml"), "-o", str(tmp_path / "o.onnx")).returncode == 0
    result = impq("verify", str(tmp_path / "o.onnx"), "--model", str(model), "--plan", str(tmp_path / "two.yaml"),
                  "--data", str(BUNDLED))
    assert result.returncode == 3 and "FAILED" in result.stdout


def test_sensitivity_writes_json_and_csv(tmp_path):
    model = BUNDLED / "model.onnx"
    prefix = tmp_path / "sens"
    result = impq("sensitivity", str(model), "--data", str(BUNDLED), "--samples", "64", "-o", str(prefix))
    assert result.returncode == 0, result.stderr
    assert "most sensitive layers" in result.stdout and "onnxruntime" not in result.stderr
    table = json.loads((tmp_path / "sens.json").read_text())
    assert table["n_samples"] == 64
    csv_lines = (tmp_path / "sens.csv").read_text().splitlines()
    assert csv_lines[0] == "kind,name,layer,sensitivity"
    assert len(csv_lines) == 1 + 154 + 5  # 154 kernels and 5 activation sites of the bundled model

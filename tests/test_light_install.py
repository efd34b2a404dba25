"""The dependency trap: with plain (mainline) onnxruntime instead of the training build, compress fails with
one line that says how to fix it (exit code 5), and inspect, evaluate, lower and verify work.

The venv gets this checkout with ``--no-deps`` plus mainline onnxruntime and the other runtime packages,
as a pipeline that only lowers and checks would install it (README, Installing).
"""

from __future__ import annotations

import os
import subprocess

import pytest
from consumer_venvs import ROOT, consumer_venv

from impq_onnx.frontend.canonical import load
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.quant.plan import PrecisionPlan

MODEL = ROOT / "models" / "fashion-mnist" / "model.onnx"
DATA = ROOT / "models" / "fashion-mnist"
PACKAGES = ["onnxruntime", "onnx>=1.16,<1.18", "onnx-ir>=0.1.10", "numpy>=1.24", "click>=8.1", "pyyaml>=6",
            "pillow>=10"]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    python = consumer_venv("mainline-ort", PACKAGES, project=True)
    version = subprocess.run([str(python), "-c", "import onnxruntime as o; print(o.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert not version.startswith("1.19."), version  # the newest mainline release, not the training build
    workdir = tmp_path_factory.mktemp("light")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(python.parent / "impq-onnx"), *args], capture_output=True, text=True,
                              cwd=workdir, env=env, timeout=600)

    return run, workdir


def test_compress_names_the_fix_in_one_line(cli):
    run, workdir = cli
    done = run("compress", str(MODEL), "--data", str(DATA), "--output", str(workdir / "out.onnx"))
    assert done.returncode == 5, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("impq-onnx: error: onnxruntime "), done.stderr
    assert "not the training build" in lines[0] and "pip install onnxruntime-training-cpu==1.19.2" in lines[0]
    assert not (workdir / "out.onnx").exists()


def test_inspect_evaluate_lower_verify_work_with_mainline_onnxruntime(cli):
    run, workdir = cli
    canonical = load(MODEL)
    plan = PrecisionPlan.uniform(find_sites(canonical), 3, 4, default_clip=4.0)
    plan_path = workdir / "plan.yaml"
    plan.save(plan_path)
    done = run("inspect", str(MODEL), "--json")
    assert done.returncode == 0 and '"layers"' in done.stdout, done.stderr
    done = run("evaluate", str(MODEL), "--data", str(DATA), "--plan", str(plan_path), "--limit-per-class", "3")
    assert done.returncode == 0 and "top-1" in done.stdout, done.stderr  # the simulation, without FakeQuant
    for fmt in ("qdq", "qonnx", "encodings"):
        out = workdir / f"lowered-{fmt}.onnx"
        done = run("lower", str(MODEL), "--plan", str(plan_path), "-o", str(out), "--format", fmt)
        assert done.returncode == 0, done.stderr
        done = run("verify", str(out), "--model", str(MODEL), "--plan", str(plan_path), "--data", str(DATA),
                   "--limit-per-class", "3")
        assert done.returncode == 0 and ": OK over 30 images" in done.stdout, done.stdout + done.stderr

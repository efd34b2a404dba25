"""Packaging: the wheel holds the LICENSE, py.typed and the demo data, its core install has no plotting
dependency, and ``impq-onnx demo`` runs from an installed wheel (the README's promise for ``pip install``)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from consumer_venvs import ROOT, consumer_venv

from impq_onnx.cli import main

BUNDLED = ROOT / "models" / "fashion-mnist"
DEMO_FILES = ["README.md", "model.onnx"] + sorted(str(p.relative_to(BUNDLED)) for p in BUNDLED.glob("*/*/*.png"))


def test_demo_data_in_the_package_are_the_bundled_model_and_images():
    package = ROOT / "impq_onnx" / "demo_data"
    assert len(DEMO_FILES) == 802
    for name in DEMO_FILES:
        assert (package / name).read_bytes() == (ROOT / "models" / "fashion-mnist" / name).read_bytes(), name


def test_demo_refuses_a_folder_that_holds_files(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    done = CliRunner().invoke(main, ["demo", "--output", str(tmp_path)])
    assert done.exit_code == 2 and "not empty; give another --output" in done.output
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"pip cannot build the wheel here: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    (path,) = out.glob("impq_onnx-*.whl")
    return path


@pytest.mark.slow
def test_wheel_contents_and_demo_from_a_fresh_install(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
        assert archive.read(next(n for n in names if n.endswith("licenses/LICENSE"))) == (ROOT / "LICENSE").read_bytes()
        assert "impq_onnx/py.typed" in names
        for name in DEMO_FILES:  # the same bytes as the repository's models/fashion-mnist
            data = archive.read(f"impq_onnx/demo_data/{name}")
            assert data == (ROOT / "models" / "fashion-mnist" / name).read_bytes(), name
    headers = [line.split(": ", 1) for line in metadata.splitlines() if ": " in line]
    assert ["License-Expression", "MIT"] in headers and ["Classifier", "Typing :: Typed"] in headers
    requires = [value for key, value in headers if key == "Requires-Dist"]
    core = [r.split(";")[0].strip() for r in requires if "extra ==" not in r]
    assert not any("matplotlib" in r for r in core)  # plotting is the optional `report` extra
    assert any(r.startswith("matplotlib") and 'extra == "report"' in r for r in requires)

    python = consumer_venv("wheel-core", core)
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = tmp_path / "demo"
    done = subprocess.run([str(python.parent / "impq-onnx"), "demo", "--quick", "--output", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    recorded = yaml.safe_load((out / "fashion-mnist.impq.config.yaml").read_text())
    assert "site-packages" in recorded["model"] and recorded["model"].endswith("impq_onnx/demo_data/model.onnx")
    for suffix in (".onnx", ".onnx.bits.json", ".plan.yaml", ".report.json", ".config.yaml", ".float.onnx"):
        assert (out / f"fashion-mnist.impq{suffix}").is_file(), suffix
    # without matplotlib: one warning line, and no HTML report
    warnings = [line for line in done.stderr.splitlines() if "no HTML report" in line]
    assert len(warnings) == 1 and "pip install 'impq-onnx[report]'" in warnings[0]
    assert not (out / "fashion-mnist.impq.report.html").exists()
    installed = subprocess.run([str(python), "-c", "import impq_onnx; print(impq_onnx.__file__)"],
                               capture_output=True, text=True, cwd=tmp_path, env=env)
    assert "site-packages" in installed.stdout  # the wheel ran, not this checkout

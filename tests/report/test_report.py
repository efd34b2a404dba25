"""report: the HTML page and PNG figures of real (tiny) compress runs on the bundled Fashion-MNIST data."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from report_runs import RUN_FIGURES, needs_model

from impq_onnx.errors import ImpqError
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.report import read_run, write_report
from impq_onnx.report.html import summary_rows
from impq_onnx.sensitivity.table import SensitivityTable


def _check_png(path: Path, html: str) -> None:
    data = path.read_bytes()
    assert data, path
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        low, high = image.convert("L").getextrema()
        assert image.size[0] > 100 and image.size[1] > 100 and low < high, f"{path} is blank"
    assert base64.b64encode(data).decode() in html, f"{path.name} is not embedded in the HTML"


@needs_model
def test_one_run_every_figure_summary_and_byte_identical(runs, tmp_path):
    result = runs["kernel"]
    work = result.paths["work_dir"]
    written = write_report(work, tmp_path / "r.html")
    html_path = tmp_path / "r.html"
    assert written == [html_path] + [tmp_path / f"r.{name}.png" for name in RUN_FIGURES]
    html = html_path.read_text(encoding="utf-8")
    for name in RUN_FIGURES:
        _check_png(tmp_path / f"r.{name}.png", html)
    assert "<script" not in html and "http" not in html  # self-contained

    # The summary table holds the final metrics of the compress report (test split: there is one).
    final = result.final
    rows = dict(r for r in summary_rows(read_run(work)) if r is not None)
    assert rows["B_w,eff [bit]"] == f"{final['weight_bits_effective']:.3f}"
    assert rows["B_a,eff [bit]"] == f"{final['activation_bits_effective']:.3f}"
    assert rows["test top-1"] == f"{100 * final['test_top1']:.2f} %"
    assert rows["CR (vs 16-bit weights)"] == f"{final['compression_ratio']:.2f}x"
    for value in rows.values():
        assert f">{value}<" in html
    assert "not recorded" not in html  # compress stores each iteration's sensitivity.json
    assert '<td class="text">max_iterations</td><td class="text">2</td>' in html  # the resolved config

    # A second render, here and in another process, gives the same bytes.
    before = {p: p.read_bytes() for p in written}
    assert write_report([work], html_path) == written
    assert {p: p.read_bytes() for p in written} == before
    other = tmp_path / "again"
    other.mkdir()
    subprocess.run([sys.executable, "-m", "impq_onnx", "report", str(work), "-o", "r.html"], cwd=other, check=True,
                   capture_output=True, timeout=120)
    assert {p.name: (other / p.name).read_bytes() for p in written} == {p.name: b for p, b in before.items()}


@needs_model
def test_sensitivity_chart_follows_the_recorded_tables(runs, tmp_path):
    work = tmp_path / "copy.work"
    shutil.copytree(runs["kernel"].paths["work_dir"], work)
    for recorded in work.glob("iterations/*/sensitivity.json"):
        recorded.unlink()
    write_report(work, tmp_path / "none.html")
    assert "Sensitivity per layer: not recorded" in (tmp_path / "none.html").read_text(encoding="utf-8")
    assert not (tmp_path / "none.sensitivity.png").exists()

    last = json.loads((work / "state.json").read_text())["iteration"]
    plan = PrecisionPlan.load(work / "iterations" / f"{last:04d}" / "plan.yaml")
    weights = {f"{node}/{k}": 1e-3 * (k + 1) for node, bits in plan.weights.items() for k in range(len(bits))}
    table = SensitivityTable(weights, {name: 1e-2 for name in plan.activations}, "kernel", "paper", "fast", 9, 32, 0.1)
    (work / "iterations" / f"{last - 1:04d}" / "sensitivity.json").write_text(table.to_json())

    written = write_report(work, tmp_path / "s.html")
    html = (tmp_path / "s.html").read_text(encoding="utf-8")
    assert tmp_path / "s.sensitivity.png" in written
    _check_png(tmp_path / "s.sensitivity.png", html)
    assert "not recorded" not in html
    assert "no compress report beside it" in html  # the copy has no copy.report.json: validation metrics only


@needs_model
def test_two_granularities_add_the_compression_ratio_figure(runs, tmp_path):
    works = [runs[g].paths["work_dir"] for g in ("kernel", "layer")]
    written = write_report(works, tmp_path / "both.html")
    html = (tmp_path / "both.html").read_text(encoding="utf-8")
    expected = [tmp_path / f"both.{label}.{name}.png" for label in ("kernel", "layer") for name in RUN_FIGURES]
    assert written == [tmp_path / "both.html", *expected, tmp_path / "both.compression_vs_accuracy.png"]
    for path in written[1:]:
        _check_png(path, html)
    assert html.count("<h2>kernel</h2>") == 1 and html.count("<h2>layer</h2>") == 1


def test_a_folder_that_is_not_a_work_dir_is_a_one_line_error(tmp_path):
    (tmp_path / "plain").mkdir()
    for path in (tmp_path / "plain", tmp_path / "missing.work"):
        with pytest.raises(ImpqError, match=f"{path} is not a compress work dir") as info:
            write_report([path], tmp_path / "r.html")
        assert "\n" not in str(info.value)
    assert not (tmp_path / "r.html").exists()


def _damage_state(key: str, value):
    def edit(work: Path) -> None:
        state = json.loads((work / "state.json").read_text())
        if key == "records":
            state["records"] = value
        else:
            state["records"][0][key] = value
        (work / "state.json").write_text(json.dumps(state))
    return edit


@pytest.mark.parametrize("damage, words", [
    (lambda work: (work / "run.json").write_text("[1, 2]"), "run identity holds a list, not a JSON object"),
    (_damage_state("records", 5), "the work dir's files are damaged (TypeError"),
    (_damage_state("weight_bits_effective", "x"), "the work dir's files are damaged (ValueError"),
])
def test_a_damaged_work_dir_is_a_one_line_user_error(runs, tmp_path, damage, words):
    """Before: exit 1 with "unexpected AttributeError / TypeError / ValueError", as if impq-onnx had a bug."""
    work = tmp_path / "damaged.work"
    shutil.copytree(runs["kernel"].paths["work_dir"], work)
    damage(work)
    with pytest.raises(ImpqError, match=re.escape(words)) as info:
        write_report(work, tmp_path / "r.html")
    assert "\n" not in str(info.value) and str(work) in str(info.value) and info.value.exit_code == 2
    assert not (tmp_path / "r.html").exists()


def test_a_report_into_its_own_work_dir_is_refused(runs, tmp_path):
    """Before: written there, after which compress --resume refused the work dir for its foreign files."""
    work = tmp_path / "run.work"
    shutil.copytree(runs["kernel"].paths["work_dir"], work)
    names = sorted(p.name for p in work.rglob("*"))
    with pytest.raises(ImpqError, match=re.escape(f"lies inside the work dir {work}; write the outputs outside it "
                                                  "(another -o)")):
        write_report(work, work / "r.html")
    with pytest.raises(ImpqError, match="lies inside the work dir #2"):  # any iterable, a generator too
        write_report((w for w in (runs["layer"].paths["work_dir"], work)), work / "r.html")
    assert sorted(p.name for p in work.rglob("*")) == names


def test_cli_not_a_work_dir_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "impq_onnx", "report", "nowhere.work", "-o", "r.html"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        ("impq-onnx: error: nowhere.work is not a compress work dir (no such folder); give the folder compress "
         "checkpoints into (<output stem>.work by default)")]

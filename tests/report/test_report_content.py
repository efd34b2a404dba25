"""report: what the page says beyond the figures' pixels: shared axes, sensitivity per kernel, the
per-layer table, and the versions and command line of the run (real tiny compress runs)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import shlex
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
from report_runs import DATA, MODEL, needs_model

from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.report import figures, read_run, write_report
from impq_onnx.report.figures import accuracy_vs_bits, kernel_sensitivity, sensitivity_per_layer
from impq_onnx.report.html import environment_rows, layer_rows


def _captured_figure(monkeypatch, draw, run):
    """The matplotlib Figure a figure function drew, kept instead of only its PNG."""
    kept = []
    real_png = figures._png

    def keep(fig):
        kept.append(fig)
        return real_png(fig)

    monkeypatch.setattr(figures, "_png", keep)
    data = draw(run)
    assert data.startswith(b"\x89PNG")
    return kept[-1]


@needs_model
def test_the_two_accuracy_panels_share_one_y_range(runs, monkeypatch):
    run = read_run(runs["kernel"].paths["work_dir"])
    # A weights phase near the float model and an activation phase far below it: separate autoscaled
    # axes would give the panels very different ranges.
    records = list(run.records)
    low = [dataclasses.replace(r, iteration=len(records) + i, phase="activations", val_top1=0.1 + 0.05 * i,
                               val_agreement=0.15 + 0.05 * i, activation_bits_effective=8.0 - i)
           for i, r in enumerate(records)]
    run = dataclasses.replace(run, records=tuple(records + low))
    fig = _captured_figure(monkeypatch, accuracy_vs_bits, run)
    weights_ax, activations_ax = [ax for ax in fig.axes if ax.get_title().endswith("(numbers: iterations)")]
    assert weights_ax.get_ylim() == activations_ax.get_ylim()
    bottom, top = weights_ax.get_ylim()
    plotted = [100 * v for r in run.records for v in (r.val_top1, r.val_agreement) if v is not None]
    assert bottom <= min(plotted) and max(plotted) <= top


@needs_model
def test_sensitivity_ranks_layers_by_mean_per_kernel_not_by_their_sum(runs, monkeypatch):
    run = read_run(runs["kernel"].paths["work_dir"])
    kernels = {layer.node: len(layer.kernel_bits) for layer in run.layers}
    few, many = min(kernels, key=kernels.get), max(kernels, key=kernels.get)
    assert kernels[few] < kernels[many]
    # Each kernel of the small layer more sensitive than any of the big one's, which has at least
    # twice as many kernels: a sum over kernels would rank the big layer first.
    assert 2 * kernels[few] <= kernels[many]
    values = {few: [2.0] * kernels[few], many: [1.0 + 0.5 * (k % 2) for k in range(kernels[many])]}
    table = {"granularity": "kernel", "weighting": "paper", "activations": {},
             "weights": {f"{node}/{k}": v for node, vs in values.items() for k, v in enumerate(vs)}}
    ranked = kernel_sensitivity(dataclasses.replace(run, sensitivity=table))
    assert list(ranked) == [n for n in kernels if n in values]  # network order
    assert ranked[few] == (2.0, 2.0, 2.0)
    assert ranked[many] == (pytest.approx(1.25), 1.0, 1.5)
    assert ranked[few][0] > ranked[many][0] and sum(values[many]) > sum(values[few])

    # A layer-granularity M (a sum over the layer's kernels) is divided by the kernel count.
    layer_table = {"granularity": "layer", "weighting": "paper", "activations": {},
                   "weights": {node: sum(vs) for node, vs in values.items()}}
    per_layer = kernel_sensitivity(dataclasses.replace(run, sensitivity=layer_table, granularity="layer"))
    assert per_layer[few] == (2.0, 2.0, 2.0)
    assert per_layer[many] == pytest.approx((1.25, 1.25, 1.25))

    fig = _captured_figure(monkeypatch, sensitivity_per_layer, dataclasses.replace(run, sensitivity=table))
    bars = fig.axes[0].patches
    assert [bar.get_height() for bar in bars] == [pytest.approx(ranked[n][0]) for n in ranked]
    assert "per kernel" in fig.axes[0].get_title()


def _layer_weights(model: onnx.ModelProto) -> dict[str, int]:
    """Weights of each Conv / Gemm node, counted from the ONNX file itself."""
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    return {node.name: sizes[node.input[1]] for node in model.graph.node if node.op_type in ("Conv", "Gemm")}


@needs_model
def test_per_layer_table_matches_the_plan_and_the_model(runs, tmp_path):
    work = runs["kernel"].paths["work_dir"]
    run = read_run(work)
    state = json.loads((work / "state.json").read_text())
    plan = PrecisionPlan.load(work / "iterations" / f"{state['final']:04d}" / "plan.yaml")
    weights = _layer_weights(onnx.load(MODEL))
    rows = layer_rows(run)
    assert [row[0] for row in rows] == [n.name for n in onnx.load(MODEL).graph.node if n.name in plan.weights]
    total = sum(sum(32 if b is None else b for b in plan.weights[node]) * weights[node] // len(plan.weights[node])
                for node in plan.weights)
    shares = []
    for layer, op, kernels, mean, low, high, act, params, share in rows:
        bits = plan.weights[layer]
        numeric = [b for b in bits if b is not None]
        assert op in ("Conv", "Gemm") and int(kernels) == len(bits)
        assert (mean, low, high) == (f"{sum(numeric) / len(numeric):.2f}", str(min(numeric)), str(max(numeric)))
        assert int(params) == weights[layer]
        layer_activation = next(x.activation_bits for x in run.layers if x.node == layer)
        assert act == ("float" if layer_activation is None else str(layer_activation))
        expected = 100 * sum(32 if b is None else b for b in bits) * weights[layer] / len(bits) / total
        assert share == f"{expected:.1f} %"
        shares.append(expected)
    assert math.isclose(sum(shares), 100.0)

    write_report(work, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<h3>Layers</h3>" in html
    for row in rows:
        cells = [f'<td class="text">{c}</td>' for c in row[:2]] + [f"<td>{c}</td>" for c in row[2:]]
        assert "<tr>" + "".join(cells) + "</tr>" in html


def _expected_versions() -> dict[str, str]:
    return {"impq_onnx": importlib.metadata.version("impq-onnx"), "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


@needs_model
def test_report_json_and_page_name_the_versions_and_the_python_api(runs, tmp_path):
    result = runs["kernel"]
    environment = json.loads(result.paths["report"].read_text())["environment"]
    assert {k: environment[k] for k in _expected_versions()} == _expected_versions()
    assert environment["python"] == ".".join(map(str, sys.version_info[:3]))
    assert environment["command"] == "Python API"
    run = read_run(result.paths["work_dir"])
    assert dict(map(tuple, environment_rows(run)))["command line"] == "Python API"
    html = result.paths["report_html"].read_text(encoding="utf-8")
    for name, version in (("onnx", onnx.__version__), ("onnxruntime", onnxruntime.__version__),
                          ("numpy", np.__version__)):
        assert f'<td class="text">{name}</td><td class="text">{version}</td>' in html
    assert '<td class="text">command line</td><td class="text">Python API</td>' in html


@needs_model
def test_the_command_line_is_recorded_when_compress_runs_from_impq_onnx(tmp_path):
    args = ["compress", str(MODEL), "--data", str(DATA), "--output", "cli.onnx", "--steps", "2", "--start-steps",
            "2", "--sensitivity-samples", "16", "--max-val-samples", "20", "--batch-size", "16", "--max-iterations",
            "1", "--target-bits", "none", "--target-act-bits", "none"]
    subprocess.run([sys.executable, "-m", "impq_onnx", *args], cwd=tmp_path, check=True, capture_output=True,
                   timeout=300)
    environment = json.loads((tmp_path / "cli.report.json").read_text())["environment"]
    assert environment["command"] == shlex.join(["impq-onnx", *args])
    assert {k: environment[k] for k in _expected_versions()} == _expected_versions()
    html = (tmp_path / "cli.report.html").read_text(encoding="utf-8")
    assert f'<td class="text">{shlex.join(["impq-onnx", *args])}</td>' in html


@needs_model
def test_a_work_dir_without_its_compress_report_says_the_environment_is_unknown(runs, tmp_path):
    work = tmp_path / "copy.work"
    shutil.copytree(runs["kernel"].paths["work_dir"], work)
    write_report(work, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "Versions and command line: unknown" in html
    assert environment_rows(read_run(work)) is None

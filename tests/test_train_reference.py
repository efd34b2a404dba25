"""models/train_reference.py: a killed training run resumes to the same bytes, and refuses other options.

The reference models (ResNet-20, the bundled Fashion-MNIST model) are trained over several sessions
with ``--resume``; these tests train the small Fashion-MNIST network on the bundled 600 images for
real (onnxruntime-training), in a subprocess that is killed after its first epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "models" / "train_reference.py"
DATA = ROOT / "models" / "fashion-mnist"


def _args(output: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "fashion_net", "--train", str(DATA / "train"), "--test", str(DATA / "test"),
            "--epochs", "2", "--lr", "0.05", "--batch-size", "64", "--threads", "1", "-o", str(output), *extra]


def _run(output: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_args(output, *extra), capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("whole") / "model.onnx"
    done = _run(output)
    assert done.returncode == 0, done.stderr
    return output


def test_killed_after_an_epoch_resumes_to_the_same_bytes(uninterrupted, tmp_path):
    output = tmp_path / "model.onnx"
    process = subprocess.Popen(_args(output), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                               start_new_session=True)
    try:
        first = json.loads(process.stdout.readline())  # the epoch line comes after that epoch's checkpoint
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.stdout.close()
        process.wait(timeout=60)
    assert first["epoch"] == 1
    assert not output.exists()
    state = json.loads((tmp_path / "model.onnx.work" / "state.json").read_text())
    assert state["epoch"] == 1

    resumed = _run(output, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1" in resumed.stdout
    assert output.read_bytes() == uninterrupted.read_bytes()
    log = [json.loads(line) for line in output.with_suffix(".log").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1, 2]
    whole = [json.loads(line) for line in uninterrupted.with_suffix(".log").read_text().splitlines()]
    assert [row["test_top1"] for row in log] == [row["test_top1"] for row in whole]


def test_resume_with_other_training_options_is_refused(uninterrupted):
    state = uninterrupted.with_name("model.onnx.work") / "state.json"
    before = state.read_bytes()
    refused = _run(uninterrupted, "--resume", "--lr", "0.1")
    assert refused.returncode == 2
    assert f"{state} was written with --lr 0.05, this run has 0.1" in refused.stderr
    assert state.read_bytes() == before


def test_resume_may_change_the_thread_count(uninterrupted):
    # All epochs are done: resuming trains nothing and rewrites the same model.
    before = uninterrupted.read_bytes()
    again = _run(uninterrupted, "--resume", "--threads", "2")
    assert again.returncode == 0, again.stderr
    assert "resuming after epoch 2" in again.stdout
    assert uninterrupted.read_bytes() == before


def test_a_fresh_start_under_resume_empties_a_stale_log(tmp_path):
    output = tmp_path / "model.onnx"
    output.with_suffix(".log").write_text('{"epoch": 1, "stale": true}\n')
    done = _run(output, "--resume")  # no checkpoint yet: a fresh start
    assert done.returncode == 0, done.stderr
    assert "resuming" not in done.stdout
    log = [json.loads(line) for line in output.with_suffix(".log").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1, 2]
    assert all("stale" not in row for row in log)


AVERAGING = ("--epochs", "3", "--lr-schedule", "constant", "--average-from", "2")


def test_weight_averaging_logs_the_average_and_resumes_to_the_same_bytes(tmp_path):
    whole = tmp_path / "whole" / "model.onnx"
    done = _run(whole, *AVERAGING)
    assert done.returncode == 0, done.stderr
    assert "(average of 2 epochs)" in done.stdout
    log = [json.loads(line) for line in whole.with_suffix(".log").read_text().splitlines()]
    assert [row["lr"] for row in log] == [0.05, 0.05, 0.05]
    assert [row.get("averaged") for row in log] == [None, 1, 2]
    assert all(0 <= row["average_top1"] <= 100 for row in log[1:])
    work = whole.parent / "model.onnx.work"
    state = json.loads((work / "state.json").read_text())
    assert sorted(p.name for p in work.iterdir()) == ["average-3.onnx", "model-3.onnx", "state.json"]
    last_weights = (work / state["weights"]).read_bytes()
    assert whole.read_bytes() != last_weights  # the output is the average, not the last epoch's weights

    killed = tmp_path / "killed" / "model.onnx"
    killed.parent.mkdir()
    process = subprocess.Popen(_args(killed, *AVERAGING), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               cwd=ROOT, start_new_session=True)
    try:
        process.stdout.readline()
        second = json.loads(process.stdout.readline())  # after the first averaged epoch's checkpoint
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.stdout.close()
        process.wait(timeout=60)
    assert second["averaged"] == 1
    resumed = _run(killed, *AVERAGING, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 2" in resumed.stdout
    assert killed.read_bytes() == whole.read_bytes()
    resumed_log = [json.loads(line) for line in killed.with_suffix(".log").read_text().splitlines()]
    assert [row["average_top1"] for row in resumed_log[1:]] == [row["average_top1"] for row in log[1:]]


def test_averaging_from_after_the_last_epoch_is_refused(tmp_path):
    refused = _run(tmp_path / "model.onnx", "--average-from", "3")
    assert refused.returncode == 2
    assert "--average-from 3 is after the last epoch (2)" in refused.stderr
    assert not (tmp_path / "model.onnx").exists()


def test_the_cyclic_schedule_anneals_every_epoch_to_its_minimum(tmp_path):
    # Same options but the rate each epoch ends at: the trained weights must differ.
    outputs = []
    for min_lr in ("0.05", "0.0005"):
        output = tmp_path / min_lr / "model.onnx"
        done = _run(output, "--lr-schedule", "cyclic", "--min-lr", min_lr)
        assert done.returncode == 0, done.stderr
        log = [json.loads(line) for line in output.with_suffix(".log").read_text().splitlines()]
        assert [row["lr"] for row in log] == [0.05, 0.05]  # every epoch starts at --lr, no warm-up
        outputs.append(output.read_bytes())
    assert outputs[0] != outputs[1]

"""Acceptance: a compress run killed with SIGKILL mid-iteration and resumed gives the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "fashion-mnist" / "model.onnx"
DATA = ROOT / "models" / "fashion-mnist"
COMMAND = [sys.executable, "-m", "impq_onnx", "compress"]

pytestmark = pytest.mark.skipif(not MODEL.is_file(), reason="the bundled Fashion-MNIST model is not built yet")

# Tiny budget, four lowering steps per phase: 10 iterations of well under a second each.
OPTIONS = ["--steps", "3", "--start-steps", "6", "--sensitivity-samples", "32", "--max-iterations", "4",
           "--target-bits", "none", "--target-act-bits", "none", "--max-val-samples", "40", "--seed", "3",
           "--batch-size", "16", "--quiet"]


def _args(folder: Path, *extra: str) -> list[str]:
    return [*COMMAND, str(MODEL), "--data", str(DATA), "--output", str(folder / "out.onnx"), *OPTIONS, *extra]


def _committed(work_dir: Path) -> int:
    try:
        return json.loads((work_dir / "state.json").read_text())["iteration"]
    except (OSError, ValueError, KeyError):
        return -1


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run."""
    folder = tmp_path_factory.mktemp("whole")
    done = subprocess.run(_args(folder), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


# Killed in iteration 2 (a weight step), 5 (the activation phase start, clip calibration) and 7 (an
# activation step that resumes from clips read back from plan.yaml).
@pytest.mark.parametrize("kill_after", [1, 4, 6])
def test_sigkill_then_resume_gives_the_uninterrupted_bytes(tmp_path, whole, kill_after):
    killed = tmp_path / "killed"
    records = json.loads((whole / "out.report.json").read_text())["iterations"]
    assert len(records) == 10

    process = subprocess.Popen(_args(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while _committed(killed / "out.work") < kill_after:
            assert process.poll() is None, f"the run ended before iteration {kill_after} was committed"
            assert time.monotonic() < deadline, f"iteration {kill_after} was never committed"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "out.onnx").exists()
    at_kill = _committed(killed / "out.work")
    assert kill_after <= at_kill < len(records) - 1, "the kill came too late to test a resume"

    again = subprocess.run(_args(killed, "--resume"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (killed / "out.plan.yaml").read_bytes() == (whole / "out.plan.yaml").read_bytes()
    assert (killed / "out.onnx").read_bytes() == (whole / "out.onnx").read_bytes()
    resumed = json.loads((killed / "out.report.json").read_text())["iterations"]
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k and k != "elapsed"} for r in rs]  # noqa: E731
    assert strip(resumed) == strip(records)


def test_resume_refuses_a_changed_option(tmp_path):
    first = subprocess.run(_args(tmp_path, "--max-iterations", "0", "--phases", "weights"), capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run(_args(tmp_path, "--max-iterations", "0", "--phases", "weights", "--seed", "4", "--resume"),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert "cannot resume, 'seed' was 3 and is now 4" in again.stderr
    fresh = subprocess.run(_args(tmp_path, "--max-iterations", "0", "--phases", "weights"), capture_output=True,
                           text=True, timeout=300)
    assert fresh.returncode == 2 and "--resume" in fresh.stderr


class _Stop(Exception):
    pass


def test_a_run_with_learned_clips_stopped_in_the_activation_phase_resumes_to_the_same_bytes(tmp_path):
    """act_clip learned: the clips each kept fine-tune learned are in the committed plans; a run stopped after an
    activation iteration resumes from them to the uninterrupted run's bytes, and its plan's clips are not the
    least-squares ones an act_clip mse run fits."""
    from impq_onnx.compression import compress
    from impq_onnx.quant.plan import PrecisionPlan

    options = dict(steps=3, start_steps=6, sensitivity_samples=32, max_iterations=2, target_bits=None,
                   target_act_bits=None, max_val_samples=40, seed=3, batch_size=16, report=False, lr=0.005)

    def run(folder: Path, **extra):
        return compress(MODEL, DATA, output=folder / "out.onnx", **dict(options, **extra))

    run(tmp_path / "whole", act_clip="learned", progress=False)
    run(tmp_path / "mse", act_clip="mse", progress=False)

    def stop_after_the_activation_start(event):
        if event.kind == "iteration" and event.step == 3:
            raise _Stop

    with pytest.raises(_Stop):
        run(tmp_path / "stopped", act_clip="learned", progress=stop_after_the_activation_start)
    assert _committed(tmp_path / "stopped" / "out.work") == 3
    run(tmp_path / "stopped", act_clip="learned", resume=True, progress=False)
    for name in ("out.onnx", "out.plan.yaml"):
        assert (tmp_path / "stopped" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    learned, mse = (PrecisionPlan.load(tmp_path / f / "out.plan.yaml") for f in ("whole", "mse"))
    assert learned.activations and all(learned.clips[t] != mse.clips[t] for t in learned.activations)


def test_a_resume_on_another_machine_warns_once_and_goes_on(tmp_path):
    """The work dir records the machine's arithmetic; resumed where it differs (here: machine.json edited as if the
    run had started on another CPU), compress names the change in a warning and finishes; on the same machine it
    says nothing."""
    first = subprocess.run(_args(tmp_path, "--max-iterations", "0", "--phases", "weights"), capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    machine = tmp_path / "out.work" / "machine.json"
    same = subprocess.run(_args(tmp_path, "--max-iterations", "0", "--phases", "weights", "--resume"),
                          capture_output=True, text=True, timeout=300)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "started on other arithmetic" not in same.stderr
    started = json.loads(machine.read_text())
    machine.write_text(json.dumps(dict(started, cpu_vendor="SomeOtherVendor")))
    moved = subprocess.run(_args(tmp_path, "--max-iterations", "0", "--phases", "weights", "--resume"),
                           capture_output=True, text=True, timeout=300)
    assert moved.returncode == 0, moved.stderr[-2000:]
    lines = [line for line in moved.stderr.splitlines() if "started on other arithmetic" in line]
    assert len(lines) == 1 and f"cpu_vendor SomeOtherVendor then, {started['cpu_vendor']} now" in lines[0]

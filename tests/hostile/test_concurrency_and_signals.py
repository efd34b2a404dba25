"""Classes: two runs on one output or work dir, and SIGINT/SIGTERM/SIGHUP. A second run on the same output or
work dir is one line naming the holder's pid while the first goes on untouched; a signal at start-up or while
the outputs are being made ends in one line, exit 130 (SIGINT) / 143 (SIGTERM) / 129 (SIGHUP), the resume
command, no output set and no lock or staging folder; the printed command then finishes the run; a signal
the run started with ignored (nohup) stays ignored."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from hostile_inputs import signals_as_in_a_terminal
from hostile_workspace import OUTPUT_SET, TINY, Workspace, command, no_partial_set, one_line_error, run, wait_for


def _start(ws: Workspace, *extra: str, ignoring: tuple[int, ...] = ()) -> subprocess.Popen:
    """compress in the workspace, started with the ``ignoring`` signals ignored (as ``nohup`` starts it) and the
    others at their default, whatever pytest inherited (run under nohup, or as a script's background job)."""
    return subprocess.Popen(command("compress", "m.onnx", "--data", "d.npz", *TINY, *extra), cwd=ws.root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=signals_as_in_a_terminal(ignoring))


def _holds_lock(lock: Path, pid: int):
    def check() -> bool:
        try:
            return lock.read_text().strip() == str(pid)
        except OSError:
            return False
    return check


@pytest.mark.parametrize("second", [["--output", "o.onnx"], ["--output", "other.onnx", "--work-dir", "o.work"]],
                         ids=["same output", "same work dir"])
def test_second_run_on_the_same_output_or_work_dir_is_refused(ws: Workspace, second: list[str]) -> None:
    first = _start(ws, "--output", "o.onnx", "--seed", "1")
    try:
        wait_for(_holds_lock(ws.root / ".o.work.lock", first.pid), first, "the first run took its locks")
        first.send_signal(signal.SIGSTOP)  # it holds its locks, whatever the machine's load
        try:
            code, stderr = run("compress", "m.onnx", "--data", "d.npz", *second, "--seed", "2", *TINY, cwd=ws.root)
        finally:
            first.send_signal(signal.SIGCONT)
        one_line_error(code, stderr, 2, "in use by another impq-onnx run", f"pid {first.pid}")
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        first.kill() if first.poll() is None else None
    assert yaml.safe_load((ws.root / "o.config.yaml").read_text())["seed"] == 1  # the first run's own outputs
    assert not (ws.root / "other.onnx").exists() and not (ws.root / "other.work").exists()
    assert not [p.name for p in ws.root.iterdir() if p.name.endswith(".lock") or p.name.startswith(".impq-")]


def _resume(ws: Workspace, line: str) -> None:
    resume = shlex.split(line.split("resume with: ", 1)[1])
    assert resume[0] == "impq-onnx" and resume[-1] == "--resume"
    done = subprocess.run(command(*resume[1:]), cwd=ws.root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert all((ws.root / f"o{suffix}").is_file() for suffix in OUTPUT_SET)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_the_outputs_are_made_leaves_no_set(ws: Workspace, signum: int) -> None:
    before = ws.digests()
    process = _start(ws, "--output", "o.onnx")
    try:
        # state.json names a stop reason once the search has ended: the run is now making and writing its
        # outputs (test metrics, lowering, verification, the report's figures, the staged set).
        wait_for(lambda: _stopped(ws), process, "the search ended")
        process.send_signal(signal.SIGSTOP)  # so that the signal lands before the commit on a loaded machine
        process.send_signal(signum)
        process.send_signal(signal.SIGCONT)
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill() if process.poll() is None else None
    line = one_line_error(process.returncode, stderr, 128 + signum, "interrupted", signal.Signals(signum).name,
                          "resume with:")
    assert no_partial_set(ws.root, "o")
    assert {k: v for k, v in ws.digests().items() if not k.startswith("o.work/")} == before
    _resume(ws, line)


def _stopped(ws: Workspace) -> bool:
    try:
        return json.loads((ws.root / "o.work" / "state.json").read_text()).get("stop") is not None
    except (OSError, ValueError):
        return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_signal_at_start_up_is_one_line(ws: Workspace, signum: int) -> None:
    """SIGHUP (the terminal or SSH session closed) as SIGINT: one line, exit 128 + the signal (130, 129), nothing
    left behind."""
    before, names = ws.digests(), ws.names()
    process = _start(ws, "--output", "o.onnx")
    try:
        # The lock appears right after the paths are checked, before the model and data are loaded.
        wait_for(_holds_lock(ws.root / ".o.onnx.lock", process.pid), process, "the run took its lock")
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill() if process.poll() is None else None
    one_line_error(process.returncode, stderr, 128 + signum, f"interrupted ({signal.Signals(signum).name})",
                   "--resume")
    assert ws.digests() == before
    assert ws.names() - names <= {"o.work", "o.work/run.json", "o.work/iterations"}  # at most an empty checkpoint


def test_a_signal_the_run_started_ignoring_stays_ignored(ws: Workspace) -> None:
    """``nohup impq-onnx compress ...`` (SIGHUP ignored) or a script's background job (SIGINT ignored): the
    handlers used to replace the ignore, so closing the terminal stopped a run started to survive it."""
    process = _start(ws, "--output", "o.onnx", ignoring=(signal.SIGHUP, signal.SIGINT))
    try:
        wait_for(_holds_lock(ws.root / ".o.onnx.lock", process.pid), process, "the run took its lock")
        process.send_signal(signal.SIGHUP)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill() if process.poll() is None else None
    assert process.returncode == 0, stderr
    assert all((ws.root / f"o{suffix}").is_file() for suffix in OUTPUT_SET)

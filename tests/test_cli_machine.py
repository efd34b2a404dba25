"""The command line for pipelines: ``--json`` (one document on stdout, the keys the README documents),
``--events`` (JSON lines), the exit codes 3 (verification failed), 4 (target not reached), 130 (interrupted,
with a resume command that resumes), ``--logits`` and its deprecated alias, ``--help`` examples, and the
progress bar on a terminal (a real pty) but not off one."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shlex
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import onnx
import pytest
from hostile_inputs import signals_as_in_a_terminal
from onnx import numpy_helper
from tiny_models import Quirks, build

from impq_onnx.cli import EXIT_INTERRUPTED, EXIT_TARGET_NOT_REACHED, EXIT_VERIFY_FAILED

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "fashion-mnist"
MODEL = BUNDLED / "model.onnx"
TINY = ["--steps", "2", "--start-steps", "2", "--sensitivity-samples", "16", "--max-iterations", "1",
        "--batch-size", "16", "--max-val-samples", "16", "--phases", "weights", "--no-report"]

# The keys README.md documents for each command's --json document.
KEYS = {
    "inspect": {"model", "input", "input_shape", "logits", "layers", "activations", "totals"},
    "evaluate": {"model", "data", "plan", "top1", "top5", "agreement", "n", "images_per_second"},
    "sensitivity": {"model", "data", "plan", "n_samples", "seconds", "ties", "granularity", "weighting", "method",
                    "outputs", "layers", "activations"},
    "lower": {"model", "plan", "format", "outputs"},
    "verify": {"lowered", "model", "plan", "ok", "samples", "agreement", "max_logit_diff", "checker_error",
               "range_violations", "record_mismatches"},
    "compress": {"model", "data", "method", "stop_reason", "target_reached", "iterations", "final", "reference",
                 "paths", "exit_code"},
    "report": {"work_dirs", "outputs"},
}


def impq(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "impq_onnx", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


def one_document(result: subprocess.CompletedProcess, command: str) -> dict:
    """stdout is exactly one JSON document holding the documented keys."""
    document, end = json.JSONDecoder().raw_decode(result.stdout)
    assert result.stdout[end:] == "\n", result.stdout  # nothing after the one document
    assert KEYS[command] <= set(document), KEYS[command] - set(document)
    return document


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """One tiny compress run of the bundled model (targets none: reached), with --json and --events."""
    folder = tmp_path_factory.mktemp("run")
    result = impq("compress", str(MODEL), "--data", str(BUNDLED), "--output", "m.onnx", *TINY, "--target-bits",
                  "none", "--target-act-bits", "none", "--json", "--events", "m.events.jsonl", cwd=folder)
    assert result.returncode == 0, result.stderr
    document = one_document(result, "compress")
    assert document["target_reached"] is True and document["exit_code"] == 0
    assert document["stop_reason"] == "max_iterations" and document["iterations"] == 2
    assert Path(folder / document["paths"]["output"]).is_file()
    return {"folder": folder, **{key: folder / path for key, path in document["paths"].items()}}


def test_compress_events_are_json_lines_in_order(run):
    events = [json.loads(line) for line in (run["folder"] / "m.events.jsonl").read_text().splitlines()]
    assert all(list(e) == ["kind", "phase", "step", "total", "message", "data"] for e in events)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "message" and kinds[-1] == "done" and kinds.count("iteration") == 2
    assert {e["phase"] for e in events} >= {"fine-tune", "evaluate", "sensitivity", "search", "compress"}
    iterations = [e for e in events if e["kind"] == "iteration"]
    assert [e["data"]["iteration"] for e in iterations] == [0, 1]
    assert iterations[1]["data"]["weight_bits_effective"] < iterations[0]["data"]["weight_bits_effective"] == 8.0
    steps = [e for e in events if e["kind"] == "step" and e["phase"] == "fine-tune"]
    # the learning-rate probe first (no --lr: one try of the 2 steps per rate), then the two iterations
    assert [e["step"] for e in steps] == [1, 2] * 6 and all(e["total"] == 2 for e in steps)
    derived = [e for e in events if e["kind"] == "message" and "lr_derived" in (e["data"] or {})]
    assert len(derived) == 1 and f"learning rate {derived[0]['data']['lr_derived']['lr']:g}, derived" in \
        derived[0]["message"]
    assert events[-1]["data"]["target_reached"] is True


def test_every_command_prints_one_json_document(run, tmp_path):
    inspect = one_document(impq("inspect", str(MODEL), "--json"), "inspect")
    assert inspect["totals"]["layers"] == len(inspect["layers"])

    evaluate = impq("evaluate", str(MODEL), "--data", str(BUNDLED), "--limit-per-class", "3", "--json")
    assert evaluate.returncode == 0, evaluate.stderr
    assert one_document(evaluate, "evaluate")["n"] == 30

    sens = impq("sensitivity", str(MODEL), "--data", str(BUNDLED), "--samples", "16", "-o", str(tmp_path / "s"),
                "--json")
    assert sens.returncode == 0, sens.stderr
    document = one_document(sens, "sensitivity")
    assert document["n_samples"] == 16 and Path(document["outputs"]["csv"]).is_file()
    values = [layer["sensitivity"] for layer in document["layers"]]
    assert values == sorted(values, reverse=True) and len(document["activations"]) == 5

    lowered = tmp_path / "l.onnx"
    lower = impq("lower", str(run["float"]), "--plan", str(run["plan"]), "-o", str(lowered), "--json")
    assert lower.returncode == 0, lower.stderr
    assert one_document(lower, "lower")["outputs"] == [str(lowered), f"{lowered}.bits.json"]

    verify = impq("verify", str(lowered), "--model", str(run["float"]), "--plan", str(run["plan"]), "--data",
                  str(BUNDLED), "--limit-per-class", "3", "--json")
    assert verify.returncode == 0, verify.stderr
    assert one_document(verify, "verify")["ok"] is True

    html = tmp_path / "r.html"
    report = impq("report", str(run["work_dir"]), "-o", str(html), "--json")
    assert report.returncode == 0, report.stderr
    assert str(html) in one_document(report, "report")["outputs"] and html.is_file()


def test_verify_of_a_tampered_model_exits_3(run, tmp_path):
    model = onnx.load(run["output"])
    weight = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT32 and len(t.dims) == 4)
    codes = numpy_helper.to_array(weight).copy()
    codes.flat[0] = codes.flat[0] + 1 if codes.flat[0] < 0 else codes.flat[0] - 1  # one step, within range
    weight.CopyFrom(numpy_helper.from_array(codes, weight.name))
    tampered = tmp_path / "t.onnx"
    onnx.save(model, tampered)
    (tmp_path / "t.onnx.bits.json").write_bytes(Path(f"{run['output']}.bits.json").read_bytes())
    result = impq("verify", str(tampered), "--model", str(run["float"]), "--plan", str(run["plan"]), "--data",
                  str(BUNDLED), "--limit-per-class", "3", "--json", "--quiet")
    assert result.returncode == EXIT_VERIFY_FAILED == 3, result.stderr
    document = one_document(result, "verify")
    assert document["ok"] is False and any(weight.name in m for m in document["record_mismatches"])


@pytest.mark.parametrize("limit", [["--time-budget", "0.001"], ["--max-iterations", "1", "--target-bits", "2"]],
                         ids=["time budget", "max iterations"])
def test_compress_that_misses_its_target_exits_4(tmp_path, limit):
    result = impq("compress", str(MODEL), "--data", str(BUNDLED), "--output", "m.onnx", *TINY,
                  "--target-act-bits", "none", *limit, "--json", cwd=tmp_path)
    assert result.returncode == EXIT_TARGET_NOT_REACHED == 4, result.stderr
    document = one_document(result, "compress")
    assert document["target_reached"] is False and document["exit_code"] == 4
    assert document["stop_reason"] == ("time_budget" if "--time-budget" in limit else "max_iterations")
    assert (tmp_path / "m.onnx").is_file()  # the outputs are written
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("impq-onnx: target not reached") and "B_w,eff" in last


def test_a_weights_only_run_that_misses_its_target_names_only_the_weight_target(tmp_path):
    # The field bench's W4 runs (--phases weights) said "B_a,eff 32.000 (target 4)" for a phase they never ran.
    result = impq("compress", str(MODEL), "--data", str(BUNDLED), "--output", "m.onnx", *TINY, "--phases", "weights",
                  "--max-iterations", "1", "--target-bits", "2", "--lr", "0.005", cwd=tmp_path)
    assert result.returncode == EXIT_TARGET_NOT_REACHED, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("impq-onnx: target not reached") and "B_w,eff" in last and "B_a,eff" not in last


def test_interrupt_from_an_event_exits_130_and_prints_a_command_that_resumes(tmp_path):
    """SIGINT lands when the first iteration's event is read from a FIFO (no timing); the printed command,
    run as is, resumes after that iteration and finishes."""
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    args = ["compress", str(MODEL), "--data", str(BUNDLED), "--output", "m.onnx", *TINY, "--target-bits", "none",
            "--events", str(fifo)]
    process = subprocess.Popen([sys.executable, "-m", "impq_onnx", *args], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=signals_as_in_a_terminal())
    try:
        with open(fifo, encoding="utf-8") as events:
            for line in events:
                if json.loads(line)["kind"] == "iteration":
                    process.send_signal(signal.SIGINT)
                    break
            rest = events.read()  # the writer never blocks on a full pipe while it unwinds
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill() if process.poll() is None else None
    assert process.returncode == EXIT_INTERRUPTED == 130, stderr
    assert '"kind": "done"' not in rest
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("impq-onnx: interrupted (SIGINT)") and "resume with: " in last
    command = shlex.split(last.split("resume with: ", 1)[1])
    assert command[0] == "impq-onnx" and command[1:] == args + ["--resume"]
    resumed = subprocess.Popen([sys.executable, "-m", "impq_onnx", *command[1:]], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with open(fifo, encoding="utf-8") as events:
        lines = [json.loads(line) for line in events]
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    # SIGINT lands within the next iteration (0 committed), or, on a slow machine, after its last one (1).
    assert lines[0]["data"]["resumed_after"] in (0, 1) and lines[-1]["kind"] == "done"
    assert (tmp_path / "m.onnx").is_file()


def test_events_to_stdout_and_json_together_is_a_usage_error(tmp_path):
    result = impq("evaluate", str(MODEL), "--data", str(BUNDLED), "--json", "--events", "-")
    assert result.returncode == 2 and "--events - and --json" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("redirect, words", [
    (">&-", "stdout is closed, so --json has nowhere to print"),
    ("> /dev/full", "stdout: no space left on the device"),
    ("--events /dev/full", "/dev/full: no space left on the device"),
])
def test_json_or_events_that_cannot_be_written_fail_naming_the_stream(redirect, words):
    """Before: a closed stdout printed nothing and exited 0; a full disk said only "No space left on device"."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    command = ["inspect", str(MODEL), "--json"] if "events" not in redirect else \
        ["evaluate", str(MODEL), "--data", str(BUNDLED), "--limit-per-class", "1"]
    line = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "impq_onnx", *command])
    result = subprocess.run(["sh", "-c", f"{line} {redirect}"], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 5, (result.returncode, result.stderr)
    assert [x for x in result.stderr.splitlines() if x.startswith("impq-onnx:")] == \
        [next(x for x in result.stderr.splitlines() if words in x)]


def test_events_on_stdout_move_the_result_to_stderr():
    result = impq("evaluate", str(MODEL), "--data", str(BUNDLED), "--limit-per-class", "2", "--events", "-")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["kind"] for e in events][0] == "phase_start" and events[-1]["kind"] == "done"
    assert events[-1]["data"]["n"] == 20 and "top-1" in result.stderr


def test_events_file_may_not_be_an_input(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(MODEL.read_bytes())
    result = impq("evaluate", str(model), "--data", str(BUNDLED), "--events", str(model))
    assert result.returncode == 2 and "is the input" in result.stderr
    assert model.read_bytes() == MODEL.read_bytes()


def test_logits_option_and_its_deprecated_alias(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(build(Quirks(softmax=True)), path)
    new = impq("inspect", str(path), "--logits", "logits", "--json")
    old = impq("inspect", str(path), "--output", "logits", "--json")
    assert new.returncode == old.returncode == 0 and new.stdout == old.stdout
    assert new.stderr == "" and old.stderr.strip() == (
        "impq-onnx: warning: --output NAME is deprecated for the logits tensor; use --logits NAME")
    assert json.loads(new.stdout)["logits"] == "logits"


@pytest.mark.parametrize("command", ["inspect", "evaluate", "sensitivity", "lower", "verify", "compress", "report",
                                     "demo"])
def test_every_help_ends_with_examples(command):
    result = impq(command, "--help")
    assert result.returncode == 0
    tail = result.stdout.rstrip().split("Examples:")[-1].strip().splitlines()
    assert 1 <= len(tail) <= 2 and all(line.strip().startswith(f"impq-onnx {command} ") for line in tail)


# ---- the terminal ---------------------------------------------------------------------------------------
def _under_pty(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run the command with stderr on a pty of 120 columns; what the terminal got, and the exit code."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "impq_onnx", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 300)
        if not ready:
            process.kill()
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return process.wait(timeout=300), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.parametrize("no_color", [False, True], ids=["colour", "NO_COLOR"])
def test_bar_with_eta_on_a_terminal_and_plain_lines_off_it(tmp_path, no_color):
    args = ["compress", str(MODEL), "--data", str(BUNDLED), "--output", "m.onnx", *TINY, "--target-bits", "none"]
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | ({"NO_COLOR": "1"} if no_color else {})
    code, screen = _under_pty(args, tmp_path, env)
    assert code == 0, screen
    assert re.search(r"iter 0 fine-tune: +\d+%\|", screen), screen  # a bar per phase, named by its iteration
    assert re.search(r"\d+/2 \[\d\d:\d\d<\d\d:\d\d", screen), screen  # elapsed < ETA
    assert "iter 1 sensitivity:" in screen and "iter 1 evaluate:" in screen
    assert re.search(r"iter +1 weights +-1 bit on \d+/154 B_w,eff", screen)  # the summary line stays
    assert ("\x1b[32m" in screen) is (not no_color)  # the bar's colour

    plain = impq(*args[:5], "p.onnx", *args[6:], cwd=tmp_path, env=env)
    assert plain.returncode == 0, plain.stderr
    assert "\x1b[" not in plain.stderr and "\r" not in plain.stderr and "%|" not in plain.stderr
    lines = plain.stderr.splitlines()
    assert lines[0].startswith("float model: validation top-1") and lines[-1].startswith("done (max_iterations)")
    # the last line puts the float figure, the drop and the agreement beside top-1
    assert re.search(r"test top-1 [\d.]+% \(float [\d.]+%, drop -?[\d.]+ points\), agreement with float [\d.]+%",
                     lines[-1]), lines[-1]
    assert sum(line.startswith("iter ") for line in lines) == 2
    assert any(line.startswith("  fine-tune step 2/2 loss") for line in lines)


def test_quiet_prints_nothing_but_the_result(tmp_path):
    result = impq("evaluate", str(MODEL), "--data", str(BUNDLED), "--limit-per-class", "2", "--quiet")
    assert result.returncode == 0 and result.stderr == ""
    assert "top-1" in result.stdout

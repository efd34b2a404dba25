"""The hostile-input suite's workspace (its fixture re-exported by conftest.py): a tiny model, a tiny .npz and a
plan, built in code, and the checks every hostile test makes (one line on stderr, no traceback, the documented
exit code, inputs unchanged by hash, no partial output set)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from quant_models import quadrant_batch, tiny_cnn

# The smallest search that still lowers, fine-tunes and writes every output (about 2 s of work).
TINY = ["--steps", "1", "--start-steps", "1", "--sensitivity-samples", "8", "--max-iterations", "1",
        "--batch-size", "8", "--max-val-samples", "8", "--target-bits", "none", "--target-act-bits", "none", "--quiet"]
OUTPUT_SET = (".onnx", ".onnx.bits.json", ".float.onnx", ".plan.yaml", ".report.json", ".config.yaml",
              ".report.html")


@dataclasses.dataclass
class Workspace:
    root: Path
    model: Path
    data: Path
    plan: Path

    def digests(self) -> dict[str, str]:
        """sha256 of every regular file under the root (inputs and anything else)."""
        return {str(p.relative_to(self.root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(self.root.rglob("*")) if p.is_file() and not p.is_symlink()}

    def names(self) -> set[str]:
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*")}


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    model = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(), model)
    x, y = quadrant_batch(64, np.random.default_rng(0))
    x = np.clip((x - x.min()) / (x.max() - x.min()) * 255, 0, 255).astype(np.uint8)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y)
    from impq_onnx.frontend.canonical import load
    from impq_onnx.frontend.site_analysis import find_sites
    from impq_onnx.quant.plan import PrecisionPlan

    sites = find_sites(load(model))
    plan = tmp_path / "p.plan.yaml"
    PrecisionPlan.uniform(sites, 4, None).save(plan)
    return Workspace(tmp_path, model, data, plan)


def cli(*args: str, cwd: Path) -> tuple[int, str]:
    """The click command line in this process (the CLI's own error handling); (exit code, stderr)."""
    from impq_onnx.cli import main

    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, list(args), catch_exceptions=True, prog_name="impq-onnx")
    finally:
        os.chdir(old)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stderr


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "impq_onnx", *args]


def run(*args: str, cwd: Path, timeout: float = 300) -> tuple[int, str]:
    """``impq-onnx ARGS`` as a user runs it (a subprocess); (exit code, stderr)."""
    done = subprocess.run(command(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stderr


def one_line_error(code: int, stderr: str, expected: int = 2, *words: str) -> str:
    """The documented failure: exit ``expected``, one ``impq-onnx:`` line on stderr, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if not line.startswith("WARNING")]
    assert code == expected, (code, stderr)
    assert len(lines) == 1 and lines[0].startswith("impq-onnx: "), stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def no_partial_set(folder: Path, stem: str) -> bool:
    """True when none of compress's outputs ``<stem>...`` exists, nor a staging folder or lock."""
    present = [s for s in OUTPUT_SET if (folder / f"{stem}{s}").exists()]
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith((".impq-staging-", f".{stem}."))
                 and (p.name.endswith(".lock") or p.name.startswith(".impq-staging-"))]
    assert not leftovers, leftovers
    return not present


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240) -> None:
    """Poll ``condition`` (a file system or output check) until it holds; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)  # a polling interval, not a timing assumption

"""Lint and type checks as part of the suite (CI runs the README's test command, so they run there too).

``ruff check`` over the repository and ``mypy`` over the package, with the configuration in
pyproject.toml (strict on the public API and the stage packages' ``__init__`` modules). Both come with
the ``test`` extra; without them these tests are skipped, saying how to install them.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed; pip install -e '.[test]' brings it")
    return subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    result = _run("ruff", "check", "--no-cache", "--output-format", "concise", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing() -> None:
    result = _run("mypy", "--no-error-summary")  # files and options: [tool.mypy] in pyproject.toml
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert result.returncode == 0 and errors == [], result.stdout + result.stderr

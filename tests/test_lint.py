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


MAX_COMMITTED_BYTES = 2 * 1024 * 1024  # the project's rule: tests and models commit small files only


def test_no_tracked_file_is_over_2_mb() -> None:
    """Larger models are committed split (``models/split_external.py``); large data stays in ../shared."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    names = [n for n in listed.stdout.decode().split("\0") if n]
    assert names, "git ls-files listed nothing"
    large = {n: (ROOT / n).stat().st_size for n in names if (ROOT / n).is_file()
             and (ROOT / n).stat().st_size > MAX_COMMITTED_BYTES}
    assert large == {}, large

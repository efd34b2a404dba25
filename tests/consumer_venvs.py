"""Throwaway virtual environments under /tmp for tests that run a consumer of our output (or a light install).

Each environment is created once per package list (a marker file records a finished install; later
sessions reuse it) with a pip cache under /tmp. When pip cannot install (no network, no index), the
calling test is skipped with pip's last line as the reason; in CI the install runs.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import venv
from pathlib import Path

import pytest

__all__ = ["consumer_venv", "ROOT"]

ROOT = Path(__file__).resolve().parents[1]
BASE = Path("/tmp/impq-onnx-test-venvs")
CACHE = BASE / "pip-cache"


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "--cache-dir", str(CACHE), *args], capture_output=True, text=True)


def consumer_venv(name: str, packages: list[str], *, project: bool = False) -> Path:
    """The python of a venv with ``packages`` (and this checkout, ``--no-deps``, if ``project``); skips on failure."""
    if project:  # building this checkout without isolation needs a PEP 517 backend in the venv
        packages = [*packages, "setuptools>=77", "wheel"]  # 77: the SPDX license expression (PEP 639)
    key = hashlib.sha256("\n".join([sys.version, *packages]).encode()).hexdigest()[:12]
    home = BASE / f"{name}-{key}"
    python = home / "bin" / "python"
    if not (home / "installed").is_file():
        venv.create(home, with_pip=True, clear=True)
        done = _pip(python, *packages)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            pytest.skip(f"pip cannot install {' '.join(packages)} here: {lines[-1] if lines else 'no output'}")
        (home / "installed").write_text("\n".join(packages) + "\n")
    if project:  # this checkout, fresh each session, without its dependencies (they are the point of the venv)
        done = _pip(python, "--no-deps", "--no-build-isolation", "--force-reinstall", str(ROOT))
        if done.returncode != 0:
            pytest.skip(f"pip cannot install the project into {home}: {done.stderr.strip().splitlines()[-1:]}")
    return python

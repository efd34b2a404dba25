"""Shared pieces of the hostile-input tests (tests/hostile/): the CLI as a user runs it, tiny image trees, hashes.

Every hostile test runs the real command in a subprocess and checks: the documented exit code, one line
on stderr and no traceback, and every input file unchanged (by SHA-256 before and after).
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from PIL import Image
from quant_models import CLASSES, tiny_cnn

__all__ = ["impq", "digest", "image_tree", "tiny_model", "assert_one_line_error", "signals_as_in_a_terminal"]


def signals_as_in_a_terminal(ignoring: tuple[int, ...] = ()):
    """A ``preexec_fn`` giving the child impq-onnx's signals at their defaults (``ignoring`` ignored, as ``nohup``
    does), whatever pytest inherited: run as a script's background job, pytest itself ignores SIGINT, and
    impq-onnx keeps a signal ignored at start ignored, so a test that sends one must not pass that on."""
    import signal

    from impq_onnx.interrupts import HANDLED

    def reset() -> None:
        for signum in HANDLED:
            signal.signal(signum, signal.SIG_IGN if signum in ignoring else signal.SIG_DFL)
    return reset


def impq(*args: str | os.PathLike, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m impq_onnx ARGS``; arguments may be bytes paths (non-UTF-8 names)."""
    argv = [sys.executable, "-m", "impq_onnx", *[os.fsencode(a) if isinstance(a, Path) else a for a in args]]
    return subprocess.run(argv, capture_output=True, text=True, errors="backslashreplace", timeout=timeout)


def digest(*roots: Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``roots`` (links not followed; FIFOs and devices skipped)."""
    hashes = {}
    for root in roots:
        walk = [root] if root.is_file() else [Path(d) / f for d, _, files in os.walk(root) for f in files]
        for path in walk:
            if stat.S_ISREG(os.lstat(path).st_mode):
                hashes[os.fsdecode(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def save_image(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def image_tree(root: Path, per_class: int = 2, classes: int = CLASSES) -> Path:
    """``root/<class k>/<i>.png``: 8x8 RGB images, as many classes as the tiny CNN has outputs."""
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            save_image(root / f"c{k}" / f"{i}.png", seed=100 * k + i)
    return root


def tiny_model(path: Path, model: onnx.ModelProto | None = None) -> Path:
    onnx.save(model if model is not None else tiny_cnn(), path)
    return path


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """The run exited with ``code``, printed no traceback, and its error is one line holding ``fragments``."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("impq-onnx: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]

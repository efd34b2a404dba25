"""Errors by cause: one line by default, the cause chain at -vv, and the exit code of each cause."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from impq_onnx.cli_options import user_errors as _user_errors
from impq_onnx.errors import (
    REPORT_HINT,
    ConfigError,
    DataError,
    ImpqError,
    InternalError,
    ModelError,
    PlanError,
    PlatformError,
    UserError,
    as_impq_error,
)


def impq(*args: str, blocked: str | None = None) -> subprocess.CompletedProcess:
    """The command in a fresh interpreter; ``blocked``: a module that interpreter cannot import (not installed)."""
    prelude = f"import sys; sys.modules[{blocked!r}] = None; " if blocked else ""
    code = prelude + "from impq_onnx.cli import main; main(prog_name='impq-onnx')"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"this is not protobuf at all \xff\xff\xff")
    return path


def test_user_error_is_one_line_without_its_cause(garbage: Path) -> None:
    result = impq("inspect", str(garbage))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"impq-onnx: error: {garbage}: not a readable ONNX model")
    assert "Traceback" not in result.stderr and "DecodeError" not in result.stderr


def test_vv_shows_the_cause_chain_then_the_one_line(garbage: Path) -> None:
    result = impq("-vv", "inspect", str(garbage))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"impq-onnx: error: {garbage}: not a readable ONNX model")
    cause = next(i for i, line in enumerate(lines) if line.startswith("google.protobuf.message.DecodeError"))
    effect = next(i for i, line in enumerate(lines) if line.startswith("impq_onnx.errors.ModelError"))
    assert cause < lines.index("The above exception was the direct cause of the following exception:") < effect


def test_a_missing_package_is_an_environment_error_exit_4(tmp_path: Path) -> None:
    """matplotlib is imported when a report is drawn; without it the report command says so in one line."""
    (tmp_path / "w").mkdir()
    result = impq("report", str(tmp_path / "w"), "-o", str(tmp_path / "r.html"), blocked="matplotlib")
    assert result.returncode == PlatformError.exit_code == 5
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("impq-onnx: error: cannot import matplotlib")
    assert list(tmp_path.iterdir()) == [tmp_path / "w"]  # no report written


def _fill_the_disk() -> None:
    with open("/dev/full", "wb") as full:
        full.write(b"x")
        full.flush()


def _open_a_missing_file() -> None:
    Path("/nonexistent-impq/file.onnx").read_bytes()


def _raise(error: BaseException) -> Callable[[], None]:
    def command() -> None:
        raise error

    return command


@pytest.mark.parametrize(
    "body, code, text",
    [
        (_raise(ModelError("m.onnx: bad\nmodel")), 2, "m.onnx: bad model"),
        (_raise(DataError("images/: 3 class folders")), 2, "images/: 3 class folders"),
        (_raise(PlanError("plan.yaml: bad bits")), 2, "plan.yaml: bad bits"),
        (_raise(ConfigError("option 'lr': -1")), 2, "option 'lr': -1"),
        (_raise(ImpqError("an old-style user error")), 2, "an old-style user error"),
        (_open_a_missing_file, 2, "/nonexistent-impq/file.onnx: no such file or folder"),
        (_raise(PlatformError("no training API")), 5, "no training API"),
        (_fill_the_disk, 5, "No space left on device"),
        (_raise(MemoryError()), 5, "out of memory; use a smaller batch size or fewer threads"),
        (_raise(InternalError("cycle in the graph")), 1, f"cycle in the graph; {REPORT_HINT}"),
        (_raise(KeyError("scale")), 1, f"unexpected KeyError: 'scale'; {REPORT_HINT}"),
    ],
)
@pytest.mark.parametrize("verbose", [0, 2])
def test_exit_code_and_message_per_cause(body: Callable[[], None], code: int, text: str, verbose: int) -> None:
    @click.group()
    @click.option("-v", "--verbose", count=True)
    def root(verbose: int) -> None:
        pass

    root.command("run")(_user_errors(body))
    result = CliRunner().invoke(root, ["-v"] * verbose + ["run"])
    assert result.exit_code == code
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"impq-onnx: error: {text}"
    if verbose:
        assert lines[0] == "Traceback (most recent call last):"
    else:
        assert len(lines) == 1


def test_every_user_class_is_a_user_error_and_keeps_its_name() -> None:
    for cls in (ModelError, DataError, PlanError, ConfigError):
        assert issubclass(cls, UserError) and issubclass(cls, ImpqError) and cls.exit_code == 2
    assert not issubclass(InternalError, UserError) and not issubclass(PlatformError, UserError)


def test_os_errors_are_the_users_or_the_machines() -> None:
    import errno

    assert as_impq_error(OSError(errno.ENOSPC, "No space left on device", "out.onnx")).exit_code == 5
    assert as_impq_error(OSError(errno.EACCES, "Permission denied", "out.onnx")).exit_code == 2
    assert str(as_impq_error(FileNotFoundError(errno.ENOENT, "No such file or directory", "m.onnx"))) == (
        "m.onnx: No such file or directory; check the path")


def test_as_impq_error_keeps_the_original_as_cause() -> None:
    original = KeyError("scale")
    error = as_impq_error(original)
    assert isinstance(error, InternalError) and error.__cause__ is original
    own = DataError("x")
    assert as_impq_error(own) is own


def test_no_raise_in_the_package_drops_its_cause() -> None:
    """``raise ... from None`` hides the cause that ``-vv`` shows; write ``from exc``."""
    import ast

    import impq_onnx

    root = Path(impq_onnx.__file__).parent
    dropped = [f"{path.relative_to(root.parent)}:{node.lineno}"
               for path in sorted(root.rglob("*.py"))
               for node in ast.walk(ast.parse(path.read_text(), str(path)))
               if isinstance(node, ast.Raise) and isinstance(node.cause, ast.Constant) and node.cause.value is None]
    assert dropped == []

"""Class: special and unsuitable output targets. An existing output that is a folder, FIFO or device is refused
before the search starts (and never opened); names too long or not UTF-8 are refused up front; a read-only
folder or a full disk (in the output folder or the work dir) is one line naming the path, and no output set
is left, partial or whole."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from hostile_workspace import TINY, Workspace, no_partial_set, one_line_error, run


def _nothing_created(ws: Workspace, names: set[str]) -> None:
    assert ws.names() == names  # no work dir (the search never started), no output, no lock, no staging


def test_existing_folder_as_output_is_refused_before_the_search(ws: Workspace) -> None:
    (ws.root / "o.onnx").mkdir()
    before, names = ws.digests(), ws.names()
    code, stderr = run("compress", "m.onnx", "--data", "d.npz", "--output", "o.onnx", *TINY, cwd=ws.root)
    one_line_error(code, stderr, 2, "o.onnx is a folder")
    assert ws.digests() == before and (ws.root / "o.onnx").is_dir()
    _nothing_created(ws, names)


def test_fifo_as_output_is_refused_and_never_opened(ws: Workspace) -> None:
    fifo = ws.root / "o.onnx"
    os.mkfifo(fifo)  # opening it for writing would block forever: the run must not
    names = ws.names()
    code, stderr = run("compress", "m.onnx", "--data", "d.npz", "--output", "o.onnx", *TINY, cwd=ws.root,
                       timeout=120)
    one_line_error(code, stderr, 2, "not a regular file")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    _nothing_created(ws, names)


def test_derived_output_on_a_device_is_refused(ws: Workspace) -> None:
    (ws.root / "o.plan.yaml").symlink_to("/dev/null")  # a derived output that resolves to a device
    code, stderr = run("compress", "m.onnx", "--data", "d.npz", "--output", "o.onnx", *TINY, cwd=ws.root)
    one_line_error(code, stderr, 2, "o.plan.yaml is not a regular file")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and (ws.root / "o.plan.yaml").is_symlink()


def test_lower_to_a_device_is_refused(ws: Workspace) -> None:
    code, stderr = run("lower", "m.onnx", "--plan", "p.plan.yaml", "-o", "/dev/null", cwd=ws.root)
    one_line_error(code, stderr, 2, "/dev/null is not a regular file")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert not Path("/dev/null.bits.json").exists()


@pytest.mark.parametrize("name, words", [("x" * 300 + ".onnx", "longer than"),
                                         (os.fsdecode(b"o\xff.onnx"), "not valid UTF-8")])
def test_bad_output_names_are_refused_up_front(ws: Workspace, name: str, words: str) -> None:
    before = ws.digests()
    code, stderr = run("compress", "m.onnx", "--data", "d.npz", "--output", name, *TINY, cwd=ws.root)
    one_line_error(code, stderr, 2, words)
    assert ws.digests() == before and len(list(ws.root.iterdir())) == 3


@contextlib.contextmanager
def _small_fs(path: Path, size: str, read_only: bool = False):
    """A tmpfs of ``size`` at ``path`` (root in a container), or a chmod-ed folder for read-only as a user."""
    path.mkdir()
    if os.geteuid() != 0:
        if not read_only:
            pytest.skip("a full disk needs a small tmpfs, which needs root")
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    options = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_read_only_output_folder_is_one_line_before_the_search(ws: Workspace) -> None:
    with _small_fs(ws.root / "ro", "1m", read_only=True) as folder:
        code, stderr = run("compress", "m.onnx", "--data", "d.npz", "--output", str(folder / "o.onnx"), *TINY,
                           cwd=ws.root)
        one_line_error(code, stderr, 2, str(folder))
        assert list(folder.iterdir()) == []
    assert not (ws.root / "ro" / "o.work").exists()


def test_sensitivity_into_a_read_only_folder_is_refused_before_measuring(ws: Workspace) -> None:
    """Before: it measured every sample, then failed naming its temporary file (ro/.sens.json.9q6in_cv.tmp)."""
    with _small_fs(ws.root / "ro", "1m", read_only=True) as folder:
        code, stderr = run("sensitivity", "m.onnx", "--data", "d.npz", "-o", str(folder / "sens"), cwd=ws.root)
        line = one_line_error(code, stderr, 2, f"cannot lock {folder}", "choose a writable folder")
        assert ".tmp" not in line and "noise gain" not in stderr and "step" not in stderr
        assert list(folder.iterdir()) == []


def test_full_output_disk_leaves_no_output_set(ws: Workspace) -> None:
    with _small_fs(ws.root / "full", "96k") as folder:
        before = ws.digests()
        code, stderr = run("compress", "m.onnx", "--data", "d.npz", "--output", str(folder / "o.onnx"),
                           "--work-dir", "w", *TINY, cwd=ws.root)
        one_line_error(code, stderr, 5, "no space left", "no output was written")  # 5: the machine's problem
        assert no_partial_set(folder, "o") and list(folder.iterdir()) == []
        assert {k: v for k, v in ws.digests().items() if not k.startswith("w/")} == before


def test_full_work_dir_disk_is_one_line(ws: Workspace) -> None:
    with _small_fs(ws.root / "full", "16k") as folder:
        code, stderr = run("compress", "m.onnx", "--data", "d.npz", "--output", "o.onnx",
                           "--work-dir", str(folder / "w"), *TINY, cwd=ws.root)
        one_line_error(code, stderr, 5, "no space left", str(folder / "w"))
    assert no_partial_set(ws.root, "o")

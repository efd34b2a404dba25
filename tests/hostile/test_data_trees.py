"""Hostile data trees: symlink loops, links out of the root, non-regular files, non-UTF-8 names.

Each is read with the correct result (every image once, in its own class) or refused with one line; the
tree is never written.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hostile_inputs import assert_one_line_error, digest, image_tree, impq, save_image, tiny_model

from impq_onnx.data import PRESETS, open_dataset
from impq_onnx.data.imagefolder import ImageFiles
from impq_onnx.errors import DataError

RAW = PRESETS["cifar"].replace(size=(8, 8))


def _counts(root) -> dict[str, int]:
    data = open_dataset(root, RAW)
    return {name: int(np.sum(data.labels == k)) for k, name in enumerate(data.classes)}


def test_links_back_up_or_across_are_read_once_and_never_as_another_class(tmp_path):
    root = image_tree(tmp_path / "data")
    expected = _counts(root)
    os.symlink(".", root / "c0" / "self")
    os.symlink(".", root / "c0" / "again")  # two self links: hung with memory growing
    os.symlink("..", root / "c1" / "up")  # read every other class as c1
    os.symlink("../c3", root / "c2" / "sibling")
    (root / "c3" / "deep").mkdir()
    os.symlink("../..", root / "c3" / "deep" / "loop")
    before = digest(root)
    assert _counts(root) == expected
    model = tiny_model(tmp_path / "m.onnx")
    result = impq("evaluate", model, "--data", root, "--json")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert json.loads(result.stdout)["n"] == sum(expected.values())
    assert "skipped" in result.stderr and "read already" in result.stderr
    assert digest(root) == before


def test_a_class_folder_that_is_a_dangling_or_looping_link_is_said(tmp_path):
    """Before: dropped without a word, so the error blamed the class count (3 class folders, 4 outputs)."""
    root = image_tree(tmp_path / "data")
    (root / "c3").rename(tmp_path / "c3-moved")
    os.symlink(tmp_path / "c3-gone", root / "c3")  # dangling: the folder was moved
    os.symlink("c4", root / "c4")  # a link to itself
    result = impq("evaluate", tiny_model(tmp_path / "m.onnx"), "--data", root)
    assert_one_line_error(result, 2, "3 class folders")
    warning = next(line for line in result.stderr.splitlines() if "lead nowhere" in line)
    assert "skipped 2 class folder links that lead nowhere (dangling, or a loop), e.g." in warning
    assert warning.endswith("data/c3")


def test_folder_links_out_of_the_root_are_followed_only_when_asked(tmp_path):
    root = image_tree(tmp_path / "data")
    elsewhere = image_tree(tmp_path / "elsewhere", per_class=3)
    os.symlink(elsewhere / "c0", root / "c0" / "more")
    os.symlink(elsewhere / "c1" / "0.png", root / "c1" / "linked.png")
    os.symlink("/", root / "c2" / "everything")
    assert _counts(root) == {"c0": 2, "c1": 3, "c2": 2, "c3": 2}  # file links are read, folder links out are not
    (root / "c2" / "everything").unlink()
    followed = open_dataset(root, RAW, follow_links_outside=True)
    assert int(np.sum(followed.labels == 0)) == 5 and int(np.sum(followed.labels == 1)) == 3


def test_a_fifo_named_png_is_skipped_and_never_opened(tmp_path):
    root = image_tree(tmp_path / "data")
    fifo = root / "c2" / "trap.png"
    os.mkfifo(fifo)
    before = digest(root)
    assert _counts(root) == {f"c{k}": 2 for k in range(4)}  # returns: the scan never opens it
    with pytest.raises(DataError, match="not a regular file"):  # given directly, refused without blocking
        ImageFiles((fifo,)).pixels(np.array([0]), RAW)
    npz = tmp_path / "arrays.npz"
    os.mkfifo(npz)
    with pytest.raises(DataError, match="arrays.npz: not a regular file"):
        open_dataset(npz, RAW)
    model = tiny_model(tmp_path / "m.onnx")
    result = impq("evaluate", model, "--data", root, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["n"] == 8 and "not regular files" in result.stderr
    assert digest(root) == before


def test_non_utf8_file_names_are_read_and_a_non_utf8_data_path_is_one_line(tmp_path):
    root = image_tree(tmp_path / "data")
    save_image(root / "c3" / os.fsdecode(b"caf\xe9.png"), seed=7)
    assert _counts(root)["c3"] == 3
    model = tiny_model(tmp_path / "m.onnx")
    result = impq("evaluate", model, "--data", root, "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["n"] == 9, result.stderr

    odd = tmp_path / os.fsdecode(b"d\xff")
    image_tree(odd)
    before = digest(odd)
    result = impq("evaluate", model, "--data", odd)
    assert_one_line_error(result, 2, "not valid UTF-8", "\\xff")
    assert digest(odd) == before


def test_control_characters_in_a_file_name_are_escaped_in_the_message(tmp_path):
    """Before: a newline in a name printed as a second line (or a space), a bell rang the terminal."""
    root = image_tree(tmp_path / "data")
    (root / "c1" / "bad\nname\a.png").write_bytes(b"not an image")
    result = impq("evaluate", tiny_model(tmp_path / "m.onnx"), "--data", root)
    assert_one_line_error(result, 2, "c1/bad\\nname\\x07.png", "cannot decode")
    assert "\a" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_which_class_reads_a_linked_folder_does_not_depend_on_the_order(tmp_path):
    root = image_tree(tmp_path / "data")
    (root / "c3" / "sub").mkdir()
    save_image(root / "c3" / "sub" / "s.png", seed=9)
    os.symlink("../c3/sub", root / "c0" / "borrowed")  # c0 is walked before c3
    (root / "c1").rename(tmp_path / "c1-real")
    os.symlink(tmp_path / "c1-real", root / "c1")  # a class folder that is a link out of the root: read
    os.symlink("c2", root / "c2-again")  # a second name for a class folder: no images of its own
    data = open_dataset(root, RAW)
    counts = {name: int(np.sum(data.labels == k)) for k, name in enumerate(data.classes)}
    assert counts == {"c0": 2, "c1": 2, "c2": 2, "c2-again": 0, "c3": 3}


def test_a_fifo_as_the_model_or_as_an_npz_in_the_data_folder_is_one_line_not_a_hang(tmp_path):
    """The model file was read with read_bytes after an is_file check, and the data folder's first *.npz was
    opened by zipfile to find the image size: a FIFO there blocked the run (checked only under a timeout)."""
    model = tiny_model(tmp_path / "m.onnx")
    fifo_model = tmp_path / "fifo.onnx"
    os.mkfifo(fifo_model)
    result = impq("inspect", fifo_model, timeout=60)
    assert result.returncode == 2 and "fifo.onnx: not a regular file" in result.stderr
    data = tmp_path / "splits"
    data.mkdir()
    os.mkfifo(data / "train.npz")
    result = impq("compress", model, "--data", data, "--output", tmp_path / "o.onnx", timeout=60)
    assert_one_line_error(result, 2, "splits")  # never opened: the folder is then no data at all
    assert not (tmp_path / "o.onnx").exists()

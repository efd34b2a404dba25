"""Hostile image and array files: decompression bombs, oversized files and arrays, 16-bit depth, corrupt
images in any split, absurd model inputs, unlabelled arrays. One line (exit 2) or the correct result."""

from __future__ import annotations

import json
import struct
import zipfile
import zlib

import numpy as np
import onnx
import pytest
from hostile_inputs import assert_one_line_error, digest, image_tree, impq, tiny_model
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from impq_onnx.data import PRESETS, limits, open_dataset
from impq_onnx.data.preprocess import fit_image
from impq_onnx.errors import DataError

RAW = PRESETS["cifar"].replace(size=(8, 8))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header that claims ``width x height`` pixels over a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


# over our limit only; over Pillow's warning limit too (it printed its DecompressionBombWarning, two more lines);
# over Pillow's error limit too
@pytest.mark.parametrize("side", [8_500, 12_000, 100_000])
def test_a_decompression_bomb_is_one_line_naming_the_file(tmp_path, side):
    root = image_tree(tmp_path / "data")
    (root / "c1" / "bomb.png").write_bytes(_png_claiming(side, side))
    before = digest(root)
    result = impq("evaluate", tiny_model(tmp_path / "m.onnx"), "--data", root)
    assert_one_line_error(result, 2, "bomb.png")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert digest(root) == before


def test_an_image_file_over_the_size_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    root = image_tree(tmp_path / "data")
    monkeypatch.setattr(limits, "MAX_IMAGE_BYTES", 100)  # a real 256 MiB file would be slow to write
    with pytest.raises(DataError, match=r"0\.png: \d+ bytes is over the limit of 100 bytes"):
        open_dataset(root, RAW)


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    wide = np.array([[0, 257, 32768, 65535]], np.uint16).repeat(4, axis=0)
    Image.fromarray(wide).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I")  # really a 16-bit image as Pillow reads it
        pixels = fit_image(image, PRESETS["fashion-mnist"].replace(size=(4, 4)))
    assert pixels[0, :, 0].tolist() == [0, 1, 128, 255]


def test_a_corrupt_image_in_test_is_found_before_the_search_starts(tmp_path):
    root = tmp_path / "data"
    image_tree(root / "train", per_class=4)
    image_tree(root / "test")
    (root / "test" / "c2" / "1.png").write_bytes((root / "test" / "c2" / "1.png").read_bytes()[:60])  # truncated
    model = tiny_model(tmp_path / "m.onnx")
    before = digest(root, model)
    result = impq("compress", model, "--data", root, "--output", tmp_path / "out" / "q.onnx", "--quiet")
    assert_one_line_error(result, 2, "test/c2/1.png", "cannot decode")
    assert "iteration" not in result.stderr and "fine-tune" not in result.stderr
    assert not (tmp_path / "out" / "q.onnx").exists()
    assert digest(root, model) == before


def _npz_claiming(path, shape) -> None:
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    text = repr(header).encode() + b" "
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + b"\0" * 64)


def test_an_npz_header_claiming_730_gib_is_one_line(tmp_path):
    data = tmp_path / "bomb.npz"
    _npz_claiming(data, (1_000_000, 1000, 784))
    model = tiny_model(tmp_path / "m.onnx")
    before = digest(data, model)
    result = impq("evaluate", model, "--data", data)
    assert_one_line_error(result, 2, "bomb.npz", "array 'x'", "730.2 GiB", "limit")
    small = tmp_path / "lying.npz"
    _npz_claiming(small, (10, 8, 8, 3))  # within the limit, but the member holds 64 bytes, not 1920
    with pytest.raises(DataError, match="header claims 1920 bytes, the file holds 64"):
        open_dataset(small, RAW)
    assert digest(data, model) == before


def test_a_model_input_of_100000_by_100000_is_one_line(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"], name="pool"),
         helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
         helper.make_node("Gemm", ["f", "w"], ["logits"], name="fc", transB=1)],
        "huge", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 100_000, 100_000])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    model = tiny_model(tmp_path / "huge.onnx", proto)
    root = image_tree(tmp_path / "data")
    before = digest(root, model)
    result = impq("evaluate", model, "--data", root)
    assert_one_line_error(result, 2, "100000x100000", "over the limit")
    assert digest(root, model) == before


def test_an_unlabelled_npz_says_there_are_no_labels_not_top1_zero(tmp_path):
    data = tmp_path / "u.npz"
    np.savez(data, x=np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    model = tiny_model(tmp_path / "m.onnx")
    result = impq("evaluate", model, "--data", data)
    assert result.returncode == 0, result.stderr
    assert "no labels" in result.stdout and "top-1" in result.stdout and "0.00 %" not in result.stdout
    result = impq("evaluate", model, "--data", data, "--json")
    assert json.loads(result.stdout)["top1"] is None

"""Issue 24, the class order as an explicit list or a labels file (``--classes`` on compress, evaluate,
sensitivity and verify): folder names are mapped to the model's class indices in the order given."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image
from tiny_models import Quirks, build
from zoo_models import CLASSES, image_folder

from impq_onnx.cli import main
from impq_onnx.data.imagefolder import parse_classes, scan_image_folder
from impq_onnx.data.model_data import open_model_data
from impq_onnx.errors import DataError
from impq_onnx.frontend.canonical import load
from impq_onnx.runtime import inference_session

NAMES = ["zeta", "eps", "delta", "beta", "alpha"]  # the model's class 0..4: not sorted order


def test_list_and_labels_file_give_the_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = image_folder(tmp_path / "d", per_class=2, names=NAMES)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(NAMES) + "\n\n")
    with caplog.at_level(logging.WARNING):
        for given in (",".join(NAMES), str(labels), " zeta, eps ,delta,beta,alpha "):
            scan = scan_image_folder(root, classes=parse_classes(given))
            assert scan.classes == tuple(NAMES)
            assert [p.parent.name for p in scan.paths[::2]] == NAMES
            assert scan.labels.tolist() == [i for i in range(CLASSES) for _ in range(2)]
    assert not [r for r in caplog.records if "class folder" in r.getMessage()]
    assert scan_image_folder(root).classes == tuple(sorted(NAMES))  # without: sorted by name


def test_a_labels_file_saved_with_a_byte_order_mark_and_crlf_reads_as_without(tmp_path: Path) -> None:
    """Notepad's UTF-8 starts with a BOM: it was kept in the first name, and the error blamed the data folder."""
    root = image_folder(tmp_path / "d", per_class=1, names=NAMES)
    labels = tmp_path / "labels.txt"
    labels.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(NAMES).encode() + b"\r\n")
    assert scan_image_folder(root, classes=parse_classes(str(labels))).classes == tuple(NAMES)


def test_listed_class_without_folder_keeps_the_numbering(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "d", per_class=1, names=["eps", "alpha"])
    scan = scan_image_folder(root, classes=parse_classes(",".join(NAMES)))
    assert scan.classes == tuple(NAMES)
    assert scan.labels.tolist() == [1, 4]


@pytest.mark.parametrize(("given", "message"), [
    ("zeta,eps,delta,beta", "'alpha' is not in --classes"),
    ("zeta,eps,zeta,delta,beta,alpha", "listed twice"),
    ("zeta,,eps", "empty class name"),
    ("labels.txx", "labels.txx: no such classes file"),  # a mistyped path was read as a one-name list
    ("lists/labels", "lists/labels: no such classes file"),
])
def test_bad_class_lists_are_one_line_errors(given: str, message: str, tmp_path: Path) -> None:
    root = image_folder(tmp_path / "d", per_class=1, names=NAMES)
    with pytest.raises(DataError, match=message):
        scan_image_folder(root, classes=parse_classes(given))


def test_empty_class_folders_warn_in_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = image_folder(tmp_path / "d", per_class=1, names=["a0"])
    for i in range(30):
        (root / f"b{i:02d}").mkdir()
    with caplog.at_level(logging.WARNING):
        scan = scan_image_folder(root)
    assert len(scan.classes) == 31
    lines = [r.getMessage() for r in caplog.records if "no images" in r.getMessage()]
    assert len(lines) == 1 and "30 class folder(s)" in lines[0]


def _predicted_folder(model_path: Path, tmp_path: Path) -> Path:
    """Images filed under the name of the class the float model predicts for them (so top-1 is 100 % in the
    model's order, and the sorted folder order is wrong)."""
    loose = tmp_path / "loose"
    (loose / "all").mkdir(parents=True)
    rng = np.random.default_rng(0)  # a colour per image plus noise: the predictions spread over classes
    pixels = np.clip(rng.integers(0, 256, (40, 1, 1, 3)) + rng.normal(0, 20, (40, 8, 8, 3)), 0, 255)
    for i, image in enumerate(pixels.astype(np.uint8)):
        Image.fromarray(image).save(loose / "all" / f"{i:02d}.png")
    canonical = load(model_path)
    dataset = open_model_data(canonical, loose / "all").evaluation
    session = inference_session(canonical.to_bytes())
    predicted = np.concatenate([session.run(None, {canonical.input_name: x})[0].argmax(1)
                                for x, _ in dataset.batches(16)])
    data = tmp_path / "data"
    for path, label in zip(sorted((loose / "all").iterdir()), predicted, strict=True):
        (data / NAMES[label]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, data / NAMES[label] / path.name)
    assert len(set(predicted.tolist())) >= 3
    return data


def test_evaluate_uses_the_given_order(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(build(Quirks(seed=3)), model)
    data = _predicted_folder(model, tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(NAMES) + "\n")

    def top1(*extra: str) -> float:
        result = CliRunner().invoke(main, ["evaluate", str(model), "--data", str(data), "--json", *extra],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.output.strip().splitlines()[-1])["top1"]

    assert top1("--classes", ",".join(NAMES)) == 1.0
    assert top1("--classes", str(labels)) == 1.0
    assert top1("--classes", ",".join(reversed(NAMES))) < 1.0
    # a full list that leaves a data folder out, then lists of another length than the model's outputs
    bad = CliRunner().invoke(main, ["evaluate", str(model), "--data", str(data), "--classes",
                                    ",".join(NAMES[:-1] + ["other"])])
    assert bad.exit_code == 2 and "is not in --classes" in bad.output
    bad = CliRunner().invoke(main, ["evaluate", str(model), "--data", str(data), "--classes", "zeta,eps"])
    assert bad.exit_code == 2 and f"option 'classes': 2 class names, but {model} has {CLASSES} outputs" in bad.output
    labels.write_text("\n".join(NAMES + ["extra"]) + "\n")
    bad = CliRunner().invoke(main, ["evaluate", str(model), "--data", str(data), "--classes", str(labels)])
    assert bad.exit_code == 2 and f"{CLASSES + 1} class names, but" in bad.output and "labels.txt" in bad.output

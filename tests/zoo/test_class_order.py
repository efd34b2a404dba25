"""Issue 24, class folders named by number (an orientation classifier's ``0 90 180 270``, ``0 .. 11``)
are ordered numerically, as the model's classes are, with one warning where text order would differ."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from zoo_models import image_folder

from impq_onnx.data.imagefolder import scan_image_folder


@pytest.mark.parametrize(("names", "expected", "warns"), [
    (["0", "90", "180", "270"], ("0", "90", "180", "270"), True),
    ([str(i) for i in range(12)], tuple(str(i) for i in range(12)), True),
    ([str(i) for i in range(10)], tuple(str(i) for i in range(10)), False),
    (["cat", "dog", "10", "2"], ("10", "2", "cat", "dog"), True),  # mixed: ambiguous, said once
    (["1", "01", "2"], ("01", "1", "2"), True),
])
def test_numeric_class_folders_are_ordered_by_number(names: list[str], expected: tuple[str, ...], warns: bool,
                                                     tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = image_folder(tmp_path / "d", per_class=1, names=names)
    with caplog.at_level(logging.WARNING):
        scan = scan_image_folder(root)
    assert scan.classes == expected
    assert [p.parent.name for p in scan.paths] == list(expected)
    assert scan.labels.tolist() == list(range(len(expected)))
    warnings = [r for r in caplog.records if "class folders" in r.getMessage()]
    assert len(warnings) == (1 if warns else 0)

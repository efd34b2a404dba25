"""report: the written page rendered by headless Chromium is a page, not a blank or broken one.

Needs Debian's ``chromium`` at /usr/bin/chromium (``apt-get install -y chromium``); skipped without it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from PIL import Image
from report_runs import needs_model

from impq_onnx.report import write_report
from impq_onnx.report.figures import _ACT, _WEIGHT

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.is_file(), reason="no /usr/bin/chromium (apt-get install -y chromium)")
WIDTH, HEIGHT = 1200, 2000


def screenshot(html: Path, png: Path, profile: Path) -> Image.Image:
    """``html`` rendered by headless Chromium at WIDTH x HEIGHT, as an RGB image."""
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               f"--screenshot={png}", f"--window-size={WIDTH},{HEIGHT}", html.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and png.is_file(), done.stderr[-2000:]
    with Image.open(png) as image:
        return image.convert("RGB")


def _rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def _near(image: Image.Image, color: str, tolerance: int = 12) -> int:
    """Pixels within ``tolerance`` of ``color`` in every channel."""
    target = _rgb(color)
    return sum(count for count, pixel in image.getcolors(WIDTH * HEIGHT)
               if all(abs(a - b) <= tolerance for a, b in zip(pixel, target)))


def _looks_rendered(image: Image.Image) -> None:
    assert image.size == (WIDTH, HEIGHT)
    colors = image.getcolors(WIDTH * HEIGHT)
    non_white = sum(count for count, pixel in colors if min(pixel) < 245)
    assert len(colors) > 300, f"{len(colors)} colours: a blank or text-only page"
    assert non_white > 0.05 * WIDTH * HEIGHT, f"{non_white} non-white pixels"
    # The embedded figures decoded and drew: their bars and lines are in the charts' colours.
    assert _near(image, _WEIGHT) > 5000 and _near(image, _ACT) > 2000


@needs_chromium
@needs_model
def test_the_report_renders_in_headless_chromium(runs, tmp_path):
    write_report(runs["kernel"].paths["work_dir"], tmp_path / "r.html")
    image = screenshot(tmp_path / "r.html", tmp_path / "r.png", tmp_path / "profile")
    _looks_rendered(image)


@needs_chromium
def test_the_check_tells_a_page_whose_images_did_not_load(tmp_path):
    """The same checks fail on a page of text whose images are missing, so they can fail."""
    rows = "".join(f"<tr><td>row {i}</td><td>{i * 1.5:.2f}</td></tr>" for i in range(60))
    (tmp_path / "broken.html").write_text(
        f"<!DOCTYPE html><html><body><h1>IMPQ report</h1><table>{rows}</table>"
        '<img alt="bits per layer" src="missing.png" width="800" height="400"></body></html>', encoding="utf-8")
    image = screenshot(tmp_path / "broken.html", tmp_path / "broken.png", tmp_path / "profile")
    with pytest.raises(AssertionError):
        _looks_rendered(image)

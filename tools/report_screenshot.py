"""Screenshot of a compress HTML report in headless Chromium, as committed in docs/report-screenshot.png.

    .venv/bin/impq-onnx compress models/fashion-mnist/model.onnx --data models/fashion-mnist \
        --output out/fashion-mnist.onnx --resume
    .venv/bin/python tools/report_screenshot.py out/fashion-mnist.report.html docs/report-screenshot.png

Needs /usr/bin/chromium (Debian: ``apt-get install -y chromium``). The page is rendered 1200 px wide
and tall enough for the whole report, cropped below the last content and stored as a 256-colour
PNG (the figures use a handful of colours, so it stays readable and small).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageChops

CHROMIUM = "/usr/bin/chromium"
WIDTH = 1200


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--height", type=int, default=6000, help="window height; the image is cropped below it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.png"
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", f"--screenshot={raw}", f"--window-size={WIDTH},{args.height}",
                        args.html.resolve().as_uri()], check=True, capture_output=True, timeout=120)
        with Image.open(raw) as image:
            page = image.convert("RGB")
    content = ImageChops.difference(page, Image.new("RGB", page.size, "white")).getbbox()
    if content is None:
        print(f"{args.html}: the rendered page is blank", file=sys.stderr)
        return 1
    page = page.crop((0, 0, WIDTH, min(page.height, content[3] + 16)))
    page.quantize(256, method=Image.Quantize.MEDIANCUT).save(args.png, optimize=True)
    print(f"{args.png}: {page.width}x{page.height}, {args.png.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

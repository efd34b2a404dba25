"""Where the field bench's files come from: registry downloads (PyPI wheels through ``pip download``, Debian
packages through ``apt-get download``, cached under the bench's ``--cache``) and the real images it makes
from them (photos, rendered PDF pages, text lines). ``field.py`` fits them to each model and runs it."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


# --------------------------------------------------------------------------------------------- registries
def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 600) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def pip_fetch(cache: Path, package: str, version: str) -> Path:
    """The wheel of ``package==version`` (``pip download --no-deps``), cached."""
    dest = cache / "pip" / f"{package}-{version}"
    found = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if not found:
        dest.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
              "--python-version", "3.11", "--platform", "manylinux2014_x86_64", "-d", str(dest),
              f"{package}=={version}"])
        found = sorted(dest.glob("*.whl"))
    return found[0]


def apt_fetch(cache: Path, package: str, version: str) -> Path:
    """The unpacked tree of the Debian package ``package=version`` (``apt-get download``), cached."""
    dest = cache / "apt" / f"{package}_{version}"
    tree = dest / "tree"
    if not tree.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", "download", f"{package}={version}"], cwd=dest)
        deb = next(dest.glob("*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(tree) + ".tmp"])
        os.replace(str(tree) + ".tmp", tree)
    return tree


def wheel_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        return z.read(member)


def pip_lib(cache: Path, package: str, version: str) -> Path:
    """A pure tool (PDF rendering) installed with pip into a folder under the cache, put on sys.path."""
    dest = cache / "pylib" / f"{package}-{version}"
    if not dest.is_dir():
        _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(dest) + ".tmp",
              f"{package}=={version}"])
        os.replace(str(dest) + ".tmp", dest)
    if str(dest) not in sys.path:
        sys.path.insert(0, str(dest))
    return dest


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()



# Photos: scikit-image's bundled sample photos and Debian wallpaper packages (photographs and artwork).
SKIMAGE = ("scikit-image", "0.25.2", ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                                       "motorcycle_left.png", "motorcycle_right.png", "brick.png", "grass.png",
                                       "gravel.png", "retina.jpg", "hubble_deep_field.jpg", "ihc.png",
                                       "camera.png", "coins.png", "moon.png"])
WALLPAPERS = [("plasma-workspace-wallpapers", "4:5.27.5-2"), ("ukui-wallpapers", "20.04.3-1.1"),
              ("lomiri-wallpapers", "20.04.0-2")]
# Documents: PDF manuals in Debian packages, rendered with pypdfium2 (PyPI).
PDFS = [("libtasn1-doc", "4.19.0-2+deb12u1", "usr/share/doc/libtasn1-doc/libtasn1.pdf"),
        ("shared-mime-info", "2.2-1", "usr/share/doc/shared-mime-info/shared-mime-info-spec.pdf")]
PDFIUM = ("pypdfium2", "4.30.0")



# --------------------------------------------------------------------------------------------- images
def photo_sources(cache: Path) -> list[tuple[str, Image.Image]]:
    out = []
    wheel = pip_fetch(cache, SKIMAGE[0], SKIMAGE[1])
    import io

    for name in SKIMAGE[2]:
        out.append((f"skimage-{name}", Image.open(io.BytesIO(wheel_member(wheel, f"skimage/data/{name}")))))
    for package, version in WALLPAPERS:
        tree = apt_fetch(cache, package, version)
        best: dict[str, Path] = {}
        for p in sorted(tree.rglob("*")):
            if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.is_file() and p.stat().st_size > 20000 \
                    and "screenshot" not in p.name:
                # plasma: one folder per wallpaper, several sizes; keep the largest file of each
                group = p.parent.parent.name if p.parent.name == "images" else p.stem
                if group not in best or p.stat().st_size > best[group].stat().st_size:
                    best[group] = p
        out += [(f"{package}-{g}", Image.open(p)) for g, p in sorted(best.items())]
    return out


def photo_crops(image: Image.Image, side: int = 320) -> list[Image.Image]:
    """15 square views of one photo: the centre at full, 0.7 (5 places) and 0.5 (3x3 grid) of the short side."""
    image = image.convert("RGB")
    if max(image.size) > 1600:
        image.thumbnail((1600, 1600), Image.BILINEAR)
    w, h = image.size
    s = min(w, h)
    boxes = [((w - s) // 2, (h - s) // 2, s)]
    for frac, grid in ((0.7, [(0, 0), (1, 0), (0, 1), (1, 1), (0.5, 0.5)]),
                       (0.5, [(i / 2, j / 2) for j in range(3) for i in range(3)])):
        c = int(s * frac)
        boxes += [(int((w - c) * fx), int((h - c) * fy), c) for fx, fy in grid]
    return [image.crop((x, y, x + c, y + c)).resize((side, side), Image.BILINEAR) for x, y, c in boxes]


def page_sources(cache: Path) -> list[tuple[str, Image.Image]]:
    pip_lib(cache, *PDFIUM)
    import pypdfium2 as pdfium  # type: ignore[import-not-found]

    pages = []
    for package, version, member in PDFS:
        pdf = pdfium.PdfDocument(str(apt_fetch(cache, package, version) / member))
        for i in range(min(len(pdf), 40)):
            bitmap = pdf[i].render(scale=1.2)
            pages.append((f"{package}-p{i}", bitmap.to_pil().convert("RGB")))
    # a page with little ink is no orientation example
    return [(n, p) for n, p in pages if (np.asarray(p.convert("L")) < 128).mean() > 0.01]


def page_views(page: Image.Image) -> list[Image.Image]:
    """The full page and two half-page windows (top and middle), as a scanner or a phone would take them."""
    w, h = page.size
    return [page, page.crop((0, 0, w, h // 2)), page.crop((0, h // 4, w, 3 * h // 4))]


def text_lines(page: Image.Image, max_lines: int = 12) -> list[Image.Image]:
    """Text lines of a rendered page by row projection, cut into pieces of aspect at most 6."""
    g = np.asarray(page.convert("L")) < 160
    rows = g.any(axis=1)
    lines, y = [], 0
    while y < len(rows) and len(lines) < max_lines:
        if rows[y]:
            y0 = y
            while y < len(rows) and rows[y]:
                y += 1
            if 8 <= y - y0 <= 60:
                cols = np.flatnonzero(g[y0:y].any(axis=0))
                x0, x1 = int(cols[0]), int(cols[-1]) + 1
                top, bottom = max(0, y0 - 3), min(len(rows), y + 3)
                height = bottom - top
                step = 6 * height
                for a in range(x0, x1, step):
                    b = min(x1, a + step)
                    if b - a >= 2 * height:
                        lines.append(page.crop((max(0, a - 3), top, b + 3, bottom)))
        y += 1
    return lines

"""Images on disk: the ImageFolder layout ``DIR/<class>/*.png`` and a flat folder of unlabeled images.

Scanning lists and sorts file names only; images are decoded with Pillow when a batch asks for them
(:func:`check_images` decodes each once, cheaply, so a broken file is found before a long run).

The walk is safe on hostile trees:

- a directory is read at most once, by its real identity ``(st_dev, st_ino)``, and every real folder
  of the tree is registered before any is read: a link back to an ancestor (``self -> .``,
  ``up -> ..``), into another class folder or to a folder already read is not followed (with a
  warning), so no image is counted twice, no class reads another's images, and the result does not
  depend on the order of the walk;
- links below the class folders that lead to folders out of the data root are not followed unless
  ``follow_links_outside=True`` is passed (a link to ``/`` would read the whole disk); the class
  folders themselves may be links anywhere (the root's entries are the user's own choice), and a link
  to a single image file is read wherever it points (trees of links into a shared image store are a
  common way to make a subset);
- only regular files count: a FIFO, socket, device or dangling link named ``*.png`` is skipped with a
  warning (and :mod:`impq_onnx.data.limits` refuses to open one, so nothing ever blocks on it);
- file names that are not valid UTF-8 are read as they are; messages show them with ``\\xNN`` escapes.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from impq_onnx.data.limits import MAX_IMAGE_BYTES, check_image, open_image, open_regular, shown
from impq_onnx.data.preprocess import Preprocess, fit_image
from impq_onnx.errors import DataError
from impq_onnx.files import MiB, read_input

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderScan", "ImageFiles", "scan_image_folder", "check_images", "first_image_size"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
CHECK_THREADS = 4  # check_images is I/O bound and Pillow decodes without the GIL


@dataclass(frozen=True)
class ImageFolderScan:
    """What a folder holds: file paths, one label each (-1 when unlabeled), and the class names."""

    paths: tuple[Path, ...]
    labels: np.ndarray
    classes: tuple[str, ...]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


@dataclass
class _Walk:
    """One scan of a data root: which real directories belong to the tree, which were read, what was skipped."""

    root: Path
    follow_links_outside: bool = False
    owned: set[tuple[int, int]] = field(default_factory=set)  # real (non-link) folders of the tree
    visited: set[tuple[int, int]] = field(default_factory=set)  # folders read
    listings: dict[str, list[os.DirEntry]] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.real_root = os.path.realpath(self.root)

    def skip(self, reason: str, path: str | os.PathLike) -> None:
        self.skipped.setdefault(reason, []).append(shown(path))

    def inside(self, path: str | os.PathLike) -> bool:
        real = os.path.realpath(path)
        return os.path.commonpath([self.real_root, real]) == self.real_root

    def listing(self, folder: str) -> list[os.DirEntry]:
        """The folder's visible entries sorted by name (listed once: :meth:`own` keeps them for the walk)."""
        cached = self.listings.pop(folder, None)
        if cached is not None:
            return cached
        try:
            with os.scandir(folder) as entries:
                return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as err:
            raise DataError(f"{shown(folder)}: cannot list the folder ({err.strerror})") from err

    def own(self, top: Path, info: os.stat_result) -> None:
        """Register ``top`` and every real folder below it, without following links: a link to one of
        them is then never followed, whatever the order of the walk (its folder is read as itself)."""
        self.owned.add((info.st_dev, info.st_ino))
        pending = [os.fspath(top)]
        while pending:
            folder = pending.pop()
            entries = self.listings[folder] = self.listing(folder)
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    sub = entry.stat(follow_symlinks=False)
                    if (sub.st_dev, sub.st_ino) not in self.owned:  # a bind mount can loop too
                        self.owned.add((sub.st_dev, sub.st_ino))
                        pending.append(entry.path)

    def images_under(self, folder: Path) -> list[Path]:
        """Image files anywhere below ``folder`` (a class folder), sorted by relative path; hidden names skipped."""
        found: list[str] = []  # paths as strings until sorted: 10,000 Path objects cost a tenth of a second
        top = os.fspath(folder)
        pending = [top]
        while pending:
            for entry in self.listing(pending.pop()):
                linked = entry.is_symlink()
                if not linked and entry.is_file(follow_symlinks=False):  # the directory entry's type: no stat
                    if _is_image(entry.name):
                        found.append(entry.path)
                    continue
                try:
                    info = entry.stat()
                except OSError:
                    if _is_image(entry.name):
                        self.skip("dangling links or unreadable entries", entry.path)
                    continue
                identity = (info.st_dev, info.st_ino)
                if stat.S_ISDIR(info.st_mode):
                    if not linked:
                        if identity not in self.visited:
                            self.visited.add(identity)
                            pending.append(entry.path)
                    elif identity in self.owned or identity in self.visited:
                        self.skip("links to a folder of the tree or read already (loops, other classes)", entry.path)
                    elif not self.follow_links_outside and not self.inside(entry.path):
                        self.skip("links to folders out of the data root", entry.path)
                    else:
                        self.visited.add(identity)
                        pending.append(entry.path)
                elif _is_image(entry.name):
                    if stat.S_ISREG(info.st_mode):
                        found.append(entry.path)
                    else:
                        self.skip("entries that are not regular files", entry.path)
        prefix = os.path.join(top, "")  # every entry.path is os.path.join(top, relative path)
        return [Path(p) for p in sorted(found, key=lambda p: os.fsencode(p[len(prefix):]))]

    def report(self) -> None:
        for reason, paths in self.skipped.items():
            logger.warning("%s: skipped %d %s, e.g. %s", shown(self.root), len(paths), reason, paths[0])


def first_image_size(root: str | os.PathLike) -> tuple[int, int] | None:
    """``(height, width)`` of the first image of an image folder (header only), or None (no folder or image).

    The folder is listed by :func:`scan_image_folder`, so links, loops and non-regular files are handled
    as everywhere else."""
    root = Path(root)
    if not root.is_dir():
        return None
    try:
        scan = scan_image_folder(root, limit_per_class=1)
    except DataError:
        return None
    for path in scan.paths:
        try:
            with open_regular(path, MAX_IMAGE_BYTES, "image file") as file, open_image(path, file) as image:
                return image.height, image.width
        except DataError:
            continue
    return None


def parse_classes(value: str | os.PathLike | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The model's class order from ``--classes``: a labels file (one class folder name per line, blank
    lines skipped) or a comma-separated list; None when not given. Duplicates and an empty list are refused."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        names = [str(v).strip() for v in value]
        where = "option 'classes'"
    elif os.path.lexists(value):  # a file, or a FIFO, device or folder that read_input refuses in one line
        try:
            text = read_input(value, 16 * MiB, "classes file", DataError).decode("utf-8-sig")  # a BOM is no name
        except UnicodeDecodeError as exc:
            raise DataError(f"{shown(value)}: cannot read the classes file ({exc}); give one class per line, "
                            "UTF-8") from exc
        names = [line.strip() for line in text.splitlines() if line.strip()]
        where = shown(value)
    elif "," not in str(value) and re.search(r"[/\\]|\.[A-Za-z0-9]{1,5}$", str(value)):
        raise DataError(f"{shown(value)}: no such classes file; give the path of a file with one class per line, "
                        "or the classes as a comma-separated list (cat,dog)")
    else:
        names = [part.strip() for part in str(value).split(",")]
        where = "option 'classes'"
    if not names or any(not n for n in names):
        raise DataError(f"{where}: empty class name in {str(value)[:80]!r}; give a comma-separated list "
                        "(cat,dog) or a file with one class per line")
    seen: set[str] = set()
    twice = [n for n in names if n in seen or seen.add(n)]  # type: ignore[func-returns-value]
    if twice:
        raise DataError(f"{where}: class {twice[0]!r} is listed twice; each class folder name once, in the "
                        "model's output order")
    return tuple(names)


def _class_order(root: Path, dirs: list[Path], classes: tuple[str, ...] | None = None) -> list[Path]:
    """Class folders in the order of ``classes`` (the model's) when given; else by name, or by number when
    every name is a distinct integer (``0 90 180 270``, ``0 .. 11``: exporters number classes, and string
    order would put 10 before 2); said once when the order is a guess that could be wrong."""
    by_name = sorted(dirs)
    if classes is not None:
        present = {p.name: p for p in by_name}
        unknown = [name for name in present if name not in classes]
        if unknown:
            raise DataError(f"{shown(root)}: class folder {shown(unknown[0])!r} is not in --classes "
                            f"({len(classes)} names); add it to the list or move the folder out of the data")
        return [present.get(name, root / name) for name in classes]
    numeric = [p for p in by_name if _is_number(p.name)]
    if numeric and len(numeric) != len(by_name):
        logger.warning("%s: class folders mix numbers and names (%s); ordered as text, which may not be the "
                       "model's order: pass --classes", root, ", ".join(p.name for p in by_name[:6])
                       + (", ..." if len(by_name) > 6 else ""))
        return by_name
    if not numeric:
        return by_name
    numbers = [int(p.name) for p in by_name]
    if len(set(numbers)) != len(numbers):
        logger.warning("%s: class folders %s name the same number twice; ordered as text (pass --classes to "
                       "give the model's order)", root, ", ".join(p.name for p in by_name))
        return by_name
    by_number = [p for _, p in sorted(zip(numbers, by_name, strict=True))]
    if by_number != by_name:
        logger.warning("%s: class folders are numbers, ordered numerically (%s = labels 0..%d); pass --classes "
                       "for another order", root, " ".join(p.name for p in by_number[:12])
                       + (" ..." if len(by_number) > 12 else ""), len(by_number) - 1)
    return by_number


def _is_number(name: str) -> bool:
    try:
        int(name)
    except ValueError:
        return False
    return True


def _stat_dir(path: Path) -> os.stat_result | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info if stat.S_ISDIR(info.st_mode) else None


def scan_image_folder(root: Path, limit_per_class: int | None = None, *,
                      follow_links_outside: bool = False, classes: tuple[str, ...] | None = None) -> ImageFolderScan:
    """List ``root/<class>/...`` images (classes sorted by name, or by number), or ``root/*`` images as unlabeled.

    A class folder without images keeps its name (and so the label numbering of the others) but
    contributes no samples, with one warning for all of them; so does a class folder that is the same
    folder as an earlier one. ``classes`` (:func:`parse_classes`) gives the label order; a listed class
    without a folder has no images. A class folder may itself be a link anywhere (the root's entries are the user's
    choice); links below the class folders follow the rules of the module docstring.
    """
    walk = _Walk(root, follow_links_outside)
    root_info = _stat_dir(root)
    if root_info is None:
        raise DataError(f"{shown(root)}: not a folder")
    try:
        children = sorted(root.iterdir(), key=lambda p: os.fsencode(p.name))
    except OSError as err:
        raise DataError(f"{shown(root)}: cannot list the folder ({err.strerror})") from err
    class_dirs = [(p, info) for p in children if not p.name.startswith(".") and (info := _stat_dir(p)) is not None]
    for p in children:  # a class folder that is a dangling link or a link loop: said, not dropped silently
        if not p.name.startswith(".") and p.is_symlink() and not os.path.exists(p):
            walk.skip("class folder links that lead nowhere (dangling, or a loop)", p)
    infos = dict(class_dirs)
    ordered = _class_order(root, list(infos), classes)
    missing = [p.name for p in ordered if p not in infos]
    class_dirs = [(path, infos[path]) for path in ordered if path in infos]
    loose = [p for p in sorted(children) if _is_image(p.name) and p not in dict(class_dirs)]
    loose = [p for p in loose if _regular(walk, p)]
    walk.owned.add((root_info.st_dev, root_info.st_ino))
    readable = {}
    # Every folder of the tree is registered before any is read, real class folders first, so that which
    # folder is read as which class never depends on the order of the walk.
    for linked in (False, True):
        for path, info in class_dirs:
            if path.is_symlink() != linked:
                continue
            if (info.st_dev, info.st_ino) in walk.owned:
                walk.skip("class folders that are a folder of the tree already", path)
                continue
            walk.own(path, info)
            walk.visited.add((info.st_dev, info.st_ino))
            readable[path.name] = path
    per_class = {p.name: (walk.images_under(readable[p.name])[:limit_per_class] if p.name in readable else [])
                 for p, _ in class_dirs}
    if classes is not None:  # the model's order, listed classes without a folder included (no images)
        per_class = {name: per_class.get(name, []) for name in classes}
    walk.report()
    paths: list[Path] = []
    labels: list[int] = []
    if any(per_class.values()):
        if loose:
            logger.warning("%s: ignoring %d image(s) outside the class folders", shown(root), len(loose))
        empty = [shown(name) for name, files in per_class.items() if not files and name not in missing]
        if empty:
            logger.warning("%s: %d class folder(s) have no images (%s), e.g. %s", shown(root), len(empty),
                           "/".join(IMAGE_EXTENSIONS), ", ".join(repr(n) for n in empty[:3]))
        if missing:
            logger.info("%s: %d listed class(es) have no folder, e.g. %s", shown(root), len(missing),
                        ", ".join(repr(shown(n)) for n in missing[:3]))
        for label, files in enumerate(per_class.values()):
            paths.extend(files)
            labels.extend([label] * len(files))
        return ImageFolderScan(tuple(paths), np.asarray(labels, np.int64), tuple(shown(n) for n in per_class))
    if loose:
        loose = loose[:limit_per_class]
        return ImageFolderScan(tuple(loose), np.full(len(loose), -1, np.int64), ())
    raise DataError(
        f"{shown(root)}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files in {shown(root)}/<class>/); "
        "point --data at a folder with one subfolder of images per class"
    )


def _regular(walk: _Walk, path: Path) -> bool:
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except OSError:
        regular = False
    if not regular:
        walk.skip("entries that are not regular files", path)
    return regular


def check_images(paths: tuple[Path, ...], threads: int = CHECK_THREADS) -> None:
    """Decode every image once, cheaply (:func:`impq_onnx.data.limits.check_image`); the first failure in
    ``paths`` order is a one-line DataError naming the file."""
    if threads > 1 and len(paths) > 1:
        with ThreadPoolExecutor(threads) as pool:
            for start in range(0, len(paths), 4096):  # bounded: a million pending futures would cost GBs
                for _ in pool.map(check_image, paths[start : start + 4096]):
                    pass
    else:
        for path in paths:
            check_image(path)


class ImageFiles:
    """A pixel source that decodes image files on demand, optionally on a few threads."""

    def __init__(self, paths: tuple[Path, ...], workers: int = 1):
        self.paths = paths
        self.workers = max(1, int(workers))

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, item: int) -> str:
        return shown(self.paths[item])

    def decode_one(self, preprocess: Preprocess):
        """A function ``path -> uint8 [H, W, C]`` pixels under ``preprocess`` (a one-line DataError on failure)."""
        return lambda path: self._decode(path, preprocess)

    def _decode(self, path: Path, preprocess: Preprocess) -> np.ndarray:
        with open_regular(path, MAX_IMAGE_BYTES, "image file") as file, open_image(path, file) as image:
            try:
                image.load()
                return fit_image(image, preprocess)
            except (OSError, SyntaxError, ValueError, EOFError) as err:
                raise DataError(f"{shown(path)}: cannot decode the image ({err}); replace or delete the file") from err
            except DataError as err:
                raise DataError(f"{shown(path)}: {err}") from err

    def pixels(self, items: np.ndarray, preprocess: Preprocess) -> np.ndarray:
        """Decoded ``uint8 [B, H, W, C]`` pixels of the given items, in the order given."""
        paths = [self.paths[i] for i in items]
        if self.workers > 1 and len(paths) > 1:
            # map keeps the input order, so the batch is the same whatever the thread timing.
            with ThreadPoolExecutor(self.workers) as pool:
                decoded = list(pool.map(lambda p: self._decode(p, preprocess), paths))
        else:
            decoded = [self._decode(p, preprocess) for p in paths]
        h, w = preprocess.size
        if not decoded:
            return np.zeros((0, h, w, preprocess.num_channels), np.uint8)
        return np.stack(decoded)

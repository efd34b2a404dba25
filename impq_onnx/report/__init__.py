"""``report``: an HTML page with the figures of one or more compress runs, read from their work dirs.

``write_report(["m.work"], "m.report.html")`` (CLI ``impq-onnx report m.work -o m.report.html``) writes
one self-contained HTML file (PNG figures embedded as base64) and the same PNGs beside it, named
``<html stem>.<figure>.png`` for one run and ``<html stem>.<run label>.<figure>.png`` plus
``<html stem>.compression_vs_accuracy.png`` (the paper's Fig. 4) for several. The same work dirs give
byte-identical files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from impq_onnx.errors import ConfigError
from impq_onnx.files import write_all
from impq_onnx.report.run_data import RunData, read_run

__all__ = ["RunData", "read_run", "write_report", "report_files"]


def _labels(paths: list[Path]) -> list[str]:
    """One file-name-safe label per run: the work dir name without ``.work``, made unique."""
    labels: list[str] = []
    seen: dict[str, int] = {}
    for path in paths:
        base = path.name.removesuffix(".work")
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._") or "run"
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return labels


def write_report(work_dirs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
                 output_html: str | os.PathLike[str]) -> list[Path]:
    """Write the report of the compress runs in ``work_dirs`` (one path or several); return the files written
    (the HTML first, then the PNGs)."""
    from impq_onnx.outputs import check_paths

    folders = [work_dirs] if isinstance(work_dirs, (str, os.PathLike)) else list(work_dirs)  # a generator once
    # not into a work dir: its files would be foreign there, and compress --resume would refuse the folder
    check_paths([("the report", Path(output_html))], {},
                trees={f"the work dir{'' if len(folders) == 1 else f' #{i + 1}'}": Path(folder)
                       for i, folder in enumerate(folders)}, flag="-o")
    files = report_files(folders, output_html)
    output = next(iter(files))
    if output.parent != Path(""):
        output.parent.mkdir(parents=True, exist_ok=True)
    write_all(files)
    return list(files)


def report_files(work_dirs, output_html: str | os.PathLike,
                 reports: dict[Path, tuple[Path, dict]] | None = None) -> dict[Path, bytes]:
    """The files of :func:`write_report` (the HTML first, then the PNGs) by path, not written.

    ``reports`` gives a run's ``<stem>.report.json`` (path and document) by work dir, for a compress
    that has not written it yet."""
    from impq_onnx.report.figures import FIGURES, compression_vs_accuracy
    from impq_onnx.report.html import render_html

    if isinstance(work_dirs, (str, os.PathLike)):
        work_dirs = [work_dirs]
    paths = [Path(p) for p in work_dirs]
    if not paths:
        raise ConfigError("report needs at least one compress work dir")
    output = Path(output_html)
    if output.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"report output {output}: the name must end in .html")
    runs = [read_run(path, label, (reports or {}).get(path)) for path, label in zip(paths, _labels(paths))]
    several = len(runs) > 1
    stem = output.with_suffix("")

    files: dict[Path, bytes] = {}
    run_figures = []
    for run in runs:
        figures: dict[str, tuple[bytes, str, str] | None] = {}
        for name, (draw, caption) in FIGURES.items():
            if name == "sensitivity" and run.sensitivity is None:
                figures[name] = None
                continue
            png = Path(f"{stem}.{run.label}.{name}.png" if several else f"{stem}.{name}.png")
            data = draw(run)
            files[png] = data
            figures[name] = (data, caption, png.name)
        run_figures.append(figures)
    comparison = None
    if several:
        png = Path(f"{stem}.compression_vs_accuracy.png")
        data = compression_vs_accuracy(runs)
        files[png] = data
        caption = ("Accuracy vs compression ratio over the weight-phase iterations of each run, as the paper's "
                   "Fig. 4 (one line per granularity).")
        comparison = (data, caption, png.name)
    page = render_html(runs, run_figures, comparison).encode("utf-8")
    return {output: page, **files}

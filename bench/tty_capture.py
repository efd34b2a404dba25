"""Capture what a terminal shows while ``impq-onnx`` runs (docs/tty-capture.txt).

    .venv/bin/python bench/tty_capture.py [-o docs/tty-capture.txt] [-- impq-onnx arguments]

Runs the command (default: the README's main job) with stdout and stderr on a pseudo-terminal of
120 x 40, then writes a cleaned capture: colour codes removed; the lines that stay on screen as they are;
each live progress bar (redrawn in place with ``\\r`` and cleared when its phase ends) as two of its
frames, at the middle and at the end of its phase, prefixed ``>``. The raw bytes go to ``<output>.raw``
unless ``--no-raw``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import re
import select
import shlex
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN_JOB = ["compress", "models/fashion-mnist/model.onnx", "--data", "models/fashion-mnist", "--output",
            "out/fashion-mnist.onnx", "--resume"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BAR = re.compile(r"^(\S.*?): +\d+%\|")


def capture(args: list[str], columns: int = 120, rows: int = 40) -> tuple[int, bytes, float]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "impq_onnx", *args], cwd=ROOT, env=env,
                               stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while select.select([master], [], [], 600)[0]:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO once the child has closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return process.wait(), b"".join(chunks), time.perf_counter() - start


def clean(raw: bytes) -> list[str]:
    text = ANSI.sub("", raw.decode("utf-8", "replace")).replace("\r\n", "\n")
    out: list[str] = []
    for line in text.split("\n"):
        frames: dict[str, list[str]] = {}
        kept: list[str] = []
        for segment in line.split("\r"):
            segment = segment.rstrip()
            if not segment:
                continue
            match = BAR.match(segment)
            if match:
                frames.setdefault(match.group(1), []).append(segment)
            else:
                kept.append(segment)
        for bar in frames.values():
            for frame in dict.fromkeys([bar[len(bar) // 2], bar[-1]]):
                out.append("> " + frame)
        out.extend(kept)
    while out and not out[-1]:
        out.pop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "tty-capture.txt")
    parser.add_argument("--no-raw", action="store_true")
    parser.add_argument("args", nargs="*", default=MAIN_JOB)
    options = parser.parse_args()
    code, raw, seconds = capture(options.args)
    lines = clean(raw)
    header = [f"$ impq-onnx {shlex.join(options.args)}",
              f"# captured on a 120x40 pseudo-terminal by bench/tty_capture.py: exit {code}, {seconds:.0f} s, "
              f"{len(raw)} bytes written to the terminal",
              "# '> ' lines: frames of a live bar (drawn in place, cleared when its phase ends), at the middle and",
              "# the end of each phase; the other lines stay on screen. Colour codes removed.", ""]
    options.output.write_text("\n".join(header + lines) + "\n", encoding="utf-8")
    if not options.no_raw:
        Path(f"{options.output}.raw").write_bytes(raw)
    print(f"exit {code}, {seconds:.1f} s; wrote {options.output}")


if __name__ == "__main__":
    main()

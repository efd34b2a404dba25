"""How the command line shows progress events (:mod:`impq_onnx.events`).

- on a terminal (stderr is a TTY): a live tqdm bar for the running phase (fine-tune steps, evaluated
  images, sensitivity samples, verified images) with the iteration, B_w,eff / B_a,eff and top-1 of the
  last iteration, and tqdm's ETA; one compact summary line per iteration stays on screen. ``NO_COLOR``
  (any non-empty value) turns colour off.
- off a terminal: the plain lines (:class:`~impq_onnx.events.PlainLines`), as before.
- ``--quiet``: neither.
- ``--events FILE``: every event as one JSON line to FILE (``-``: stdout), whatever the above.

tqdm is imported only when a bar is drawn; without it (a light install) the plain lines are shown.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from impq_onnx.events import Event, PlainLines, Progress, lowering_text

__all__ = ["Renderer", "color_enabled", "counted", "summary_line"]

_UNITS = {"fine-tune": "step", "evaluate": "img", "sensitivity": "sample", "verify": "img"}


def color_enabled(env: dict[str, str] | None = None) -> bool:
    """False when ``NO_COLOR`` is set to anything non-empty (no-color.org)."""
    return not (env if env is not None else os.environ).get("NO_COLOR")


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def summary_line(data: dict[str, Any]) -> str:
    """The compact one-line summary of an iteration event's ``data`` (the record), for the terminal."""
    what = (lowering_text(int(data.get("lowered") or 0), int(data.get("reducible") or 0)) if data.get("kind") == "lower"
            else str(data.get("kind")))
    line = (f"iter {data['iteration']:3d} {data['phase']:<11s} {what:<16s} "
            f"B_w,eff {data['weight_bits_effective']:.2f}  B_a,eff {data['activation_bits_effective']:.2f}  "
            f"top-1 {_pct(data.get('val_top1'))} (float {_pct(data.get('float_top1'))})  "
            f"{data.get('seconds', 0.0):.1f} s")
    if data.get("stop"):
        line += f"  [stop: {data['stop']}]"
    elif data.get("phase_end"):
        line += f"  [phase end: {data['phase_end']}]"
    return line


class Renderer:
    """The ``progress`` callback of a command: bars or plain lines on ``stream`` (stderr), JSON lines on
    ``events``. ``tty`` / ``color`` default to what ``stream`` and ``NO_COLOR`` say."""

    def __init__(self, *, quiet: bool = False, events: IO[str] | None = None, stream: IO[str] | None = None,
                 tty: bool | None = None, color: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.events = events
        self.quiet = quiet
        self.tty = (tty if tty is not None else _isatty(self.stream)) and not quiet
        self.color = color_enabled() if color is None else color
        self.plain = None if quiet or self.tty else PlainLines(stream=self.stream)
        self._tqdm: Any = None
        if self.tty:
            try:
                from tqdm import tqdm
            except ImportError:  # a light install without tqdm: the plain lines
                self.tty, self.plain = False, PlainLines(stream=self.stream)
            else:
                self._tqdm = tqdm
        self._bar: Any = None
        self._phase: str | None = None
        self._last: dict[str, Any] = {}  # the last iteration's record
        self._next_iteration: int | None = None

    # ---- the callback -------------------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        if self.events is not None:
            self.events.write(event.to_json() + "\n")
            self.events.flush()
        if self.plain is not None:
            self.plain(event)
        elif self.tty:
            self._draw(event)

    def close(self) -> None:
        """Remove a bar still on screen (an error or an interrupt cut its phase short)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ---- the terminal -------------------------------------------------------------------------------
    def _draw(self, event: Event) -> None:
        if event.kind == "phase_start":
            self.close()
            self._phase = event.phase
            self._bar = self._tqdm(total=event.total, desc=self._description(event.phase), leave=False,
                                   file=self.stream, unit=_UNITS.get(event.phase, "it"), dynamic_ncols=True,
                                   colour="green" if self.color else None, mininterval=0, miniters=1)
            self._bar.set_postfix_str(self._postfix(event), refresh=False)
        elif event.kind == "step" and self._bar is not None and event.phase == self._phase:
            self._bar.set_postfix_str(self._postfix(event), refresh=False)  # drawn by the update
            if event.step is not None and event.step > self._bar.n:
                self._bar.update(event.step - self._bar.n)
        elif event.kind == "phase_end" and event.phase == self._phase:
            self.close()
            if event.level == 0 and event.message:  # a command's own phase (evaluate, sensitivity): its result
                self._write(event.message)
        elif event.kind == "iteration":
            self.close()
            self._last = dict(event.data)
            self._next_iteration = int(event.data["iteration"]) + 1
            self._write(self._style(summary_line(event.data), "stop" in event.data and event.data["stop"]))
        elif event.kind == "message" and event.message:
            if "resumed_after" in event.data:
                self._next_iteration = int(event.data["resumed_after"]) + 1
            elif "float_top1" in event.data:
                self._next_iteration = 0
                self._last = {"float_top1": event.data["float_top1"]}
            self._write(str(event).strip())
        elif event.kind == "done" and event.message:
            self.close()
            self._write(self._style(event.message, True))

    def _description(self, phase: str) -> str:
        if self._next_iteration is None:
            return phase
        return f"iter {self._next_iteration} {phase}"

    def _postfix(self, event: Event) -> str:
        parts = []
        if "weight_bits_effective" in self._last:
            parts.append(f"B_w,eff {self._last['weight_bits_effective']:.2f} "
                         f"B_a,eff {self._last['activation_bits_effective']:.2f} "
                         f"top-1 {_pct(self._last.get('val_top1'))}")
        if "loss" in event.data:
            parts.append(f"loss {event.data['loss']:.3f}")
        elif event.data.get("top1") is not None:
            parts.append(f"eval {_pct(event.data['top1'])}")
        return " | ".join(parts)

    def _style(self, line: str, bold: bool = False) -> str:
        if not self.color:
            return line
        import click

        return click.style(line, fg="cyan", bold=bool(bold))

    def _write(self, line: str) -> None:
        if self._tqdm is not None:
            self._tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def counted(batches: Iterable[Any], progress: Progress | None, phase: str, total: int | None,
            message: str = "{phase} {n} images") -> Iterator[Any]:
    """``batches`` as they are, with ``phase_start``, a ``step`` per batch consumed (``step``: images) and a
    ``phase_end`` event to ``progress``; for the loops that report nothing themselves (verify)."""
    if progress is None:
        yield from batches
        return
    progress(Event("phase_start", phase, "", 0, total))
    n, start = 0, time.perf_counter()
    for batch in batches:
        yield batch
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        n += len(x)
        speed = n / max(time.perf_counter() - start, 1e-9)
        progress(Event("step", phase, message.format(phase=phase, n=n), n, total, {"images": n,
                                                                                   "images_per_second": speed}))
    progress(Event("phase_end", phase, "", n, total, {"images": n}))

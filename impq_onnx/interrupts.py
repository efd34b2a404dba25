"""SIGINT, SIGTERM and SIGHUP for the command line: one line, exit 130 / 143 / 129, nothing half-written.

:func:`run` is the ``impq-onnx`` entry point. It installs handlers that raise :class:`Interrupted`
before the package's heavy modules are imported, so a signal at start-up is handled as any other. A
signal the process started with ignored stays ignored: ``nohup`` ignores SIGHUP, and a shell ignores
SIGINT for the jobs a script puts in the background; such a run goes on as the user asked.
The exception unwinds the run (staging folders and locks are cleaned up on the way, see
:mod:`impq_onnx.outputs`; the work dir keeps its last committed iteration), and :func:`run` prints
one line with the command that resumes the run. The library itself installs no handler.
"""

from __future__ import annotations

import shlex
import signal
import sys
from types import FrameType

from impq_onnx.stop_signals import STOP_SIGNALS

__all__ = ["HANDLED", "Interrupted", "install", "run"]

HANDLED = STOP_SIGNALS  # the ones outputs.deferred_signals holds back during a rename sequence
_NAMES = {s: signal.Signals(s).name for s in HANDLED}


class Interrupted(BaseException):
    """Raised by the CLI's signal handlers; a BaseException so that ``except Exception`` lets it through."""

    def __init__(self, signum: int):
        super().__init__(_NAMES.get(signum, str(signum)))
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum: int, frame: FrameType | None) -> None:
    # Once is enough: a second signal while unwinding would cut the cleanup short.
    for held in HANDLED:
        signal.signal(held, signal.SIG_IGN)
    raise Interrupted(signum)


def install() -> None:
    for signum in HANDLED:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup, or a background job of a script
            signal.signal(signum, _raise)


def _resume_hint(argv: list[str]) -> str:
    if "compress" not in argv:
        return "nothing was written; run the command again"
    command = ["impq-onnx", *argv] + ([] if "--resume" in argv else ["--resume"])
    return ("no outputs were written, the work dir keeps the last finished iteration; resume with: "
            + shlex.join(command))


def run() -> None:
    """``impq-onnx``: the click command line with the signal handling above."""
    install()
    try:
        from impq_onnx.cli import main
        from impq_onnx.report.environment import record_command_line

        record_command_line(sys.argv[1:])  # for the report's "command" (the library never reads argv)
        main(prog_name="impq-onnx")
    except Interrupted as exc:
        argv = [a.encode("utf-8", "backslashreplace").decode("utf-8") for a in sys.argv[1:]]
        print(f"impq-onnx: interrupted ({exc}); {_resume_hint(argv)}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)

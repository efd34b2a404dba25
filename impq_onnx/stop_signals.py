"""The signals that stop a run: SIGINT (Ctrl-C), SIGTERM (kill, a scheduler), SIGHUP (the terminal or SSH session
closed; POSIX only). :mod:`impq_onnx.interrupts` handles them; :func:`impq_onnx.outputs.deferred_signals` holds
them back during a rename sequence. A module of its own so that the entry point imports nothing else before its
handlers are installed."""

from __future__ import annotations

import signal

__all__ = ["STOP_SIGNALS"]

STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)

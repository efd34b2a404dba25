"""Proving that onnxruntime can run a model, with errors that name the node at fault."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import platform
import re
import time
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort

from impq_onnx.errors import ModelError

__all__ = ["Laps", "available_cores", "check_runs", "lap", "recording_laps", "default_replicas", "inference_session",
           "resolve_threads", "MIN_REPLICA_BATCH", "MIN_EVAL_PART", "undo_onnxruntime_logging",
           "root_logging_unchanged", "cpu_fields", "arithmetic"]

# A fine-tune replica normalises batch-norm over its own part of the batch: never fewer images than this.
MIN_REPLICA_BATCH = 16
MIN_EVAL_PART = 16  # images per evaluation session at the least when a batch is split over sessions


class Laps:
    """Wall time split into named laps: each :func:`lap` call adds the time since the previous one to its name.

    Every second between :func:`recording_laps` and its end lands in exactly one lap, so the laps add up to
    the wall time (``bench/iteration_profile.py`` splits an IMPQ iteration this way)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now


_LAPS: contextvars.ContextVar[Laps | None] = contextvars.ContextVar("impq_laps", default=None)


@contextlib.contextmanager
def recording_laps() -> Iterator[Laps]:
    """Record the :func:`lap` calls made (in this thread) inside the ``with`` block."""
    laps = Laps()
    token = _LAPS.set(laps)
    try:
        yield laps
    finally:
        _LAPS.reset(token)


def lap(name: str) -> None:
    """The time since the previous lap was spent on ``name`` (nothing happens unless laps are recorded)."""
    laps = _LAPS.get()
    if laps is not None:
        laps.lap(name)


# The CPU features that decide which float kernels onnxruntime's MLAS runs (SGEMM, convolution, activation
# vectors: SSE, AVX, AVX2/FMA, AVX-512, AMX; NEON, SVE on ARM). Kernels of two widths add a dot product in
# different orders, so their results differ in the last bits.
_VECTOR_FLAGS = frozenset({"sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq",
                           "avx512vl", "avx512cd", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                           "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "sve2"})


def cpu_fields(cpuinfo: str = "/proc/cpuinfo") -> dict[str, str] | None:
    """The first processor's ``key: value`` lines of ``cpuinfo`` (Linux's /proc/cpuinfo format); None where it
    cannot be read."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    return fields or None


def arithmetic(cpuinfo: str = "/proc/cpuinfo") -> dict[str, object]:
    """What decides the last bits of onnxruntime's float results on this machine: the architecture, the CPU's
    vendor, its vector features that MLAS chooses kernels by, and the onnxruntime and numpy versions. Two machines
    with different values can fine-tune the same model to different last bits, which a long fine-tune amplifies;
    equal values do not promise equal bits (two Intel Xeons with AVX-512 computed alike; an AMD EPYC with AVX-512
    did not), but a difference is worth a warning. Not host-specific otherwise (no model name, host or cores)."""
    fields = cpu_fields(cpuinfo) or {}
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"machine": platform.machine(),
            "cpu_vendor": fields.get("vendor_id") or fields.get("CPU implementer"),
            "vector_flags": sorted(flags & _VECTOR_FLAGS),
            "onnxruntime": ort.__version__,
            "numpy": np.__version__}


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, so a ``taskset`` or a container's cpuset counts)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """``threads``, or every available core when None (the default of every command)."""
    return available_cores() if threads is None else int(threads)


def default_replicas(threads: int, batch_size: int, optimizer: str = "sgd") -> int:
    """The fastest fine-tune replica count: one single-threaded replica per thread (onnxruntime's intra-op
    threading is poor on a training step's small GEMMs: on 2 cores 2 replicas train ResNet-20 about 2x as
    fast as 1), as long as each replica keeps ``MIN_REPLICA_BATCH`` images of the batch; 1 with an
    optimizer other than SGD (replicas need SGD)."""
    if optimizer != "sgd":
        return 1
    return max(1, min(int(threads), int(batch_size) // MIN_REPLICA_BATCH))



# onnxruntime (1.19, the training build) imports onnxruntime.tools.ort_format_model, whose logger module
# calls logging.basicConfig with this format at import: a handler on the root logger, so that the
# caller's own logging.basicConfig() does nothing afterwards. The handler is recognised by its format.
_ORT_ROOT_FORMAT = "%(asctime)s %(name)s [%(levelname)s] - %(message)s"


def undo_onnxruntime_logging() -> None:
    """Remove the root-logger handler that importing onnxruntime adds (a library configures no logging)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        formatter = handler.formatter
        if (type(handler) is logging.StreamHandler and formatter is not None
                and formatter._fmt == _ORT_ROOT_FORMAT):
            root.removeHandler(handler)


undo_onnxruntime_logging()


@contextlib.contextmanager
def root_logging_unchanged() -> Iterator[None]:
    """Remove the root-logger handlers added inside the block. onnxruntime-training's ``generate_artifacts``
    logs with ``logging.info(...)``, which calls ``logging.basicConfig()`` when the root logger has no
    handler yet (a library's call, in a program that has not configured logging)."""
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)
        undo_onnxruntime_logging()

_NO_KERNEL = re.compile(r"Could not find an implementation for (\S+)\((\d+)\) node with name '([^']*)'")
_BAD_NODE = re.compile(r"(?:of operator \((\w+)\) )?in node \(([^)]*)\)")
_UNKNOWN_OP = re.compile(r"(?:Fatal error: )?([\w.]*):(\w+)\((-?\d+)\) is not a registered function/op")


def inference_session(model_bytes: bytes, threads: int | None = None, *,
                      optimize: bool = True, optimized_path: str | None = None) -> ort.InferenceSession:
    """A CPU session on ``threads`` intra-op threads (None: every available core); ``optimized_path``:
    where onnxruntime writes the graph it runs."""
    options = ort.SessionOptions()
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
    if not optimize:  # the model exactly as written: no fusion into integer kernels, and no pre-packed
        # constant weights (a Gemm with a constant B sums in another blocking order than one with a computed B)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.intra_op_num_threads = resolve_threads(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def check_runs(canonical) -> None:
    """Build a session for ``canonical``; turn a refusal into a one-line error naming the node."""
    try:
        inference_session(canonical.to_bytes(), threads=1)
    except Exception as exc:  # onnxruntime raises its own exception types per status code
        message = str(exc)
        label = canonical.label
        found = _NO_KERNEL.search(message)
        if found:
            op, version, node = found.groups()
            raise ModelError(
                f"{label}: node '{node}' ({op}, opset {version}) cannot run in onnxruntime {ort.__version__}; "
                "re-export without it or replace it with standard ops"
            ) from exc
        found = _UNKNOWN_OP.search(message)
        if found:
            domain, op, _ = found.groups()
            nodes = [n.name for n in canonical.model.graph if n.op_type == op and n.domain == domain] or ["?"]
            raise ModelError(
                f"{label}: node '{nodes[0]}' uses op {domain + ':' if domain else ''}{op}, which onnxruntime "
                f"{ort.__version__} does not know; re-export without it or register its custom-op library"
            ) from exc
        found = _BAD_NODE.search(message)
        if found:
            op, node = found.groups()
            reason = message.split(" : ")[-1].split(" in node ")[0] if " : " in message else message
            raise ModelError(
                f"{label}: node '{node}'{f' ({op})' if op else ''} cannot run in onnxruntime {ort.__version__}: "
                f"{reason.strip()}; fix or re-export the model"
            ) from exc
        first_line = message.splitlines()[0] if message else exc
        raise ModelError(f"{label}: onnxruntime cannot run the model: {first_line}") from exc

"""Proving that onnxruntime can run a model, with errors that name the node at fault."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

import onnxruntime as ort

from impq_onnx.errors import ModelError

__all__ = ["check_runs", "inference_session", "undo_onnxruntime_logging", "root_logging_unchanged"]

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


def inference_session(model_bytes: bytes, threads: int = 2, *, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:  # the model exactly as written: no fusion into integer kernels, and no pre-packed
        # constant weights (a Gemm with a constant B sums in another blocking order than one with a computed B)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.intra_op_num_threads = threads
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

"""The work directory of a compress run: everything a killed run needs to resume, written atomically.

Layout::

    <work_dir>/run.json                  what the run is (resolved config + input model digest)
    <work_dir>/machine.json              the arithmetic it started on (impq_onnx.runtime.arithmetic): not part
                                         of its identity; a resume elsewhere is warned of, not refused
    <work_dir>/state.json                the commit point: loop state after the last finished iteration
    <work_dir>/iterations/0003/plan.yaml     plan after iteration 3
    <work_dir>/iterations/0003/weights.npz   the float (shadow) parameters fine-tuned so far
    <work_dir>/iterations/0003/metrics.json  that iteration's record
    <work_dir>/iterations/0003/sensitivity.json  the noise gains that chose what iteration 3 lowered

Every file is written to a temporary name in the same folder, flushed, fsync'ed and moved into place
with ``os.replace``, so a reader sees the old or the new file, never a partial one. An iteration's
files are written first and ``state.json`` last: an iteration exists once ``state.json`` names it;
files of an iteration that ``state.json`` does not name yet are ignored (and overwritten on resume).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from impq_onnx.files import write_atomic, write_temporary
from impq_onnx.errors import ConfigError, one_line
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.runtime import arithmetic

__all__ = ["WorkDir", "write_atomic", "write_temporary", "STATE_VERSION"]

STATE_VERSION = 1


def _json(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=True, allow_nan=True) + "\n"


def values_to_bytes(values: dict[str, np.ndarray]) -> bytes:
    names = sorted(values)
    buffer = io.BytesIO()
    arrays = {f"a{i}": np.asarray(values[name]) for i, name in enumerate(names)}
    np.savez(buffer, __names__=np.array(json.dumps(names)), **arrays)
    return buffer.getvalue()


def values_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        names = json.loads(str(npz["__names__"]))
        return {name: np.array(npz[f"a{i}"]) for i, name in enumerate(names)}


def read_values(path: Path, work_dir: Path, fix: str = "remove it to start over") -> dict[str, np.ndarray]:
    """The parameter values a checkpoint file holds, or a one-line ConfigError naming it and ``fix``: a damaged
    work dir (a truncated copy, a hand edit) is not a bug of the run that reads it."""
    try:
        return values_from_bytes(path.read_bytes())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"work_dir {work_dir}: {path.relative_to(work_dir)} is not a checkpoint impq-onnx wrote "
                          f"({type(exc).__name__}); the work dir is damaged: {fix}") from exc


def _shown(value: Any) -> str:
    """A recorded value in one short line (machine.json is the user's file, hand edits included)."""
    text = ("+".join(map(str, value)) or "none") if isinstance(value, list) else str(value)
    return one_line(text, 200)


class WorkDir:
    """One run's work directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # ---- run identity ---------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    def has_state(self) -> bool:
        return self.state_path.is_file()

    def start(self, identity: dict) -> None:
        """A fresh run: refuse to overwrite another run's state (resume it or remove the folder)."""
        if self.has_state():
            state = self.load_state()
            raise ConfigError(
                f"work_dir {self.path} already holds a run (iteration {state.get('iteration')}); "
                "pass --resume to continue it, or remove the folder to start over"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "iterations").mkdir(exist_ok=True)
        write_atomic(self.path / "machine.json", _json(arithmetic()))
        write_atomic(self.path / "run.json", _json(identity))

    def machine_change(self, current: dict | None = None) -> str | None:
        """On resume: a warning line when this machine's arithmetic (``current``, by default
        :func:`impq_onnx.runtime.arithmetic`) differs from the one the run started on; None when it is the same,
        or the work dir predates ``machine.json`` or cannot say."""
        try:
            started = json.loads((self.path / "machine.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        current = arithmetic() if current is None else current
        if not isinstance(started, dict) or started == current:
            return None
        changed = "; ".join(f"{key} {_shown(started.get(key))} then, {_shown(current.get(key))} now"
                            for key in sorted(set(started) | set(current)) if started.get(key) != current.get(key))
        return (f"work_dir {self.path}: this run started on other arithmetic ({changed}): onnxruntime's float "
                "kernels differ in their last bits there, so from here the run will not repeat the bytes of an "
                "uninterrupted run on either machine, and a long fine-tune can end at another accuracy; resume on "
                "the machine that started it to repeat its bytes")

    def check_identity(self, identity: dict, legacy: dict | None = None) -> dict:
        """On resume: the run must be the same run (same config and input model). ``legacy`` maps an option
        added after a work dir was written to the value that computes what the version without it did: such a
        work dir resumes when the option has that value now. It also maps an option whose default became
        "not given" (None, derived during the run) to its old default: a work dir that recorded that value
        resumes when the option is not given now, and the returned dict holds the recorded values to run
        with (``{"lr": 0.005}``); otherwise it is empty."""
        legacy = legacy or {}
        adopted: dict = {}
        try:
            saved = json.loads((self.path / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"work_dir {self.path}: run.json is missing or unreadable; cannot resume") from exc
        if not isinstance(saved, dict):
            raise ConfigError(f"work_dir {self.path}: run.json holds a {type(saved).__name__}, not a run's identity "
                              "(damaged); cannot resume, start a new work_dir")
        for key in sorted(set(saved) | set(identity)):
            if key not in saved and key in legacy and identity.get(key) == legacy[key]:
                continue
            if key not in saved and key in legacy and identity.get(key) is None:
                adopted[key] = legacy[key]  # written before the option, resumed without it: the old value
                continue
            if key not in saved:
                raise ConfigError(
                    f"work_dir {self.path}: cannot resume, it was written by an impq-onnx without the option "
                    f"'{key}' (now {identity.get(key)!r}); finish it with that version or start a new work_dir"
                )
            if key in legacy and identity.get(key) is None and key in saved and saved[key] == legacy[key]:
                adopted[key] = saved[key]
                continue
            if saved.get(key) != identity.get(key):
                raise ConfigError(
                    f"work_dir {self.path}: cannot resume, '{key}' was {saved.get(key)!r} and is now "
                    f"{identity.get(key)!r}; use the same options or a new work_dir"
                )
        return adopted

    # ---- state ----------------------------------------------------------------------------------
    def load_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"work_dir {self.path}: state.json is unreadable ({exc}); cannot resume") from exc
        if not isinstance(state, dict) or not isinstance(state.get("records", []), list):
            raise ConfigError(f"work_dir {self.path}: state.json is not a run's state (damaged); cannot resume, "
                              "start a new work_dir")
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"work_dir {self.path}: state version {state.get('version')!r} is not {STATE_VERSION}")
        return state

    def iteration_dir(self, iteration: int) -> Path:
        return self.path / "iterations" / f"{iteration:04d}"

    def save_iteration(self, iteration: int, plan: PrecisionPlan, values: dict[str, np.ndarray], record: dict,
                       sensitivity=None) -> None:
        """``sensitivity`` (a SensitivityTable, when one was measured) goes to ``sensitivity.json`` for reports."""
        folder = self.iteration_dir(iteration)
        folder.mkdir(parents=True, exist_ok=True)
        if sensitivity is not None:
            write_atomic(folder / "sensitivity.json", sensitivity.to_json())
        write_atomic(folder / "plan.yaml", plan.to_yaml())
        write_atomic(folder / "weights.npz", values_to_bytes(values))
        write_atomic(folder / "metrics.json", _json(record))

    def commit(self, state: dict) -> None:
        """Make the iteration ``state['iteration']`` the one a resume starts from."""
        write_atomic(self.state_path, _json(dict(state, version=STATE_VERSION)))

    def load_iteration(self, iteration: int) -> tuple[PrecisionPlan, dict[str, np.ndarray]]:
        folder = self.iteration_dir(iteration)
        plan = PrecisionPlan.load(folder / "plan.yaml")
        return plan, read_values(folder / "weights.npz", self.path)

    def prune(self, keep: set[int]) -> None:
        """Drop the weights of committed iterations not in ``keep`` (plans and metrics stay)."""
        root = self.path / "iterations"
        for folder in sorted(root.iterdir()) if root.is_dir() else ():
            if folder.name.isdigit() and int(folder.name) not in keep:
                with contextlib.suppress(OSError):
                    (folder / "weights.npz").unlink()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

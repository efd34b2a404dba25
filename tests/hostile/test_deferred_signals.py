"""deferred_signals holds SIGINT/SIGTERM back even when the kernel hands the signal to another thread.

A process-directed signal goes to any thread that does not block it (numpy's BLAS workers, onnxruntime's
pool), and Python then runs the handler in the main thread at its next bytecode: blocking the signal in the
main thread's sigmask alone let a SIGINT land inside OutputSet's set-up and leave a staging folder behind.
The C-level handler writes the signal number to the wakeup fd, so each test knows the signal has arrived
before it leaves the deferred block.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from pathlib import Path

import pytest

from impq_onnx.outputs import OutputSet, deferred_signals


class Raised(BaseException):
    pass


def _raise(signum: int, frame: object) -> None:
    raise Raised(signum)


@pytest.fixture
def other_thread_and_wakeup_fd():
    """A thread that does not block the signals (so the kernel may deliver them there), and a wakeup pipe."""
    done = threading.Event()
    thread = threading.Thread(target=done.wait)
    thread.start()
    read, write = os.pipe()
    os.set_blocking(write, False)
    old_fd = signal.set_wakeup_fd(write)
    old = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield read
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(old_fd)
        os.close(read)
        os.close(write)
        done.set()
        thread.join()


def _arrived(read: int) -> int:
    ready, _, _ = select.select([read], [], [], 60)
    assert ready, "the signal never reached the process"
    return os.read(read, 1)[0]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_sent_to_the_process_waits_for_the_end_of_the_block(other_thread_and_wakeup_fd, signum) -> None:
    steps = []
    with pytest.raises(Raised) as raised:
        with deferred_signals():
            os.kill(os.getpid(), signum)  # process-directed, as from a shell or a test harness
            assert _arrived(other_thread_and_wakeup_fd) == signum
            for step in range(1000):  # bytecodes, each a point where Python runs pending handlers
                steps.append(step)
    assert len(steps) == 1000 and raised.value.args == (signum,)
    assert signal.getsignal(signum) is _raise  # the caller's handler is back


def test_nothing_is_delivered_without_a_signal_and_ignored_signals_stay_ignored(other_thread_and_wakeup_fd) -> None:
    with deferred_signals():
        pass
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    with pytest.raises(Raised) as raised:
        with deferred_signals():  # the ignored SIGHUP is not swapped: noted first, it used to hide the SIGTERM
            os.kill(os.getpid(), signal.SIGHUP)
            os.kill(os.getpid(), signal.SIGTERM)
            assert _arrived(other_thread_and_wakeup_fd) == signal.SIGTERM  # the SIGHUP never reaches the process
            for _ in range(1000):
                pass
    assert raised.value.args == (signal.SIGTERM,)
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN


def test_output_set_opened_under_a_signal_leaves_no_staging_folder(other_thread_and_wakeup_fd, tmp_path: Path) -> None:
    outputs = OutputSet([tmp_path / "o.onnx", tmp_path / "o.plan.yaml"], locked=[tmp_path / "o.onnx"])
    real = outputs._staging_folder

    def staging_after_a_signal(folder: Path) -> Path:  # the signal arrives once the folder is made
        made = real(folder)
        os.kill(os.getpid(), signal.SIGINT)
        assert _arrived(other_thread_and_wakeup_fd) == signal.SIGINT
        for _ in range(1000):
            pass
        return made

    outputs._staging_folder = staging_after_a_signal
    with pytest.raises(Raised):
        with outputs:
            pytest.fail("the signal did not stop the run")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_outside_the_main_thread_nothing_is_swapped() -> None:
    """Python runs handlers in the main thread only, and signal.signal refuses other threads: the block runs
    as it is, and the main thread's handlers stay what they were."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    ran: list[bool] = []

    def body() -> None:
        with deferred_signals():
            ran.append(True)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert ran == [True] and {s: signal.getsignal(s) for s in before} == before

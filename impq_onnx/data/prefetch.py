"""Batch preparation overlapped with compute: one background thread reads an iterator a few items ahead.

Decoding, augmenting and normalising the next batch (numpy and Pillow, which release the GIL) runs
while onnxruntime (which releases it too) trains or evaluates on the current one. One producer thread
reads the source in its own order, so the items come out exactly as the source yields them: the
results do not depend on thread timing. An exception of the source is raised in the consumer, at the
item where it happened; :meth:`Prefetch.close` (or leaving the ``with`` block) stops the thread, so
none outlives its loop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["Prefetch", "PREFETCH_DEPTH"]

T = TypeVar("T")
PREFETCH_DEPTH = 2  # batches ready ahead of the consumer (each one batch of float32 model input)
_END = object()


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetch(Generic[T]):
    """Iterate ``source`` ``depth`` items ahead in a daemon thread (same items, same order)."""

    def __init__(self, source: Iterable[T], depth: int = PREFETCH_DEPTH):
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, args=(iter(source),), name="impq-prefetch",
                                        daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_Raised(exc))
            return
        self._put(_END)

    def __iter__(self) -> Prefetch[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            self._thread.join()
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            self._thread.join()
            raise item.exc
        return item

    def close(self) -> None:
        """Stop the producer (it ends after the item it is reading) and wait for it."""
        self._done = True
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The prefetch thread: same items in the same order, errors where they happened, no thread left behind."""

from __future__ import annotations

import threading

import pytest

from impq_onnx.data.prefetch import Prefetch
from impq_onnx.errors import DataError


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "impq-prefetch"]


def test_items_come_in_the_source_order():
    with Prefetch(iter(range(100)), depth=3) as ahead:
        assert list(ahead) == list(range(100))
    assert list(Prefetch([])) == []
    assert not _prefetch_threads()


def test_an_error_of_the_source_is_raised_at_its_item():
    def source():
        yield 1
        yield 2
        raise DataError("x.png: cannot decode the image")

    seen = []
    with pytest.raises(DataError, match="x.png"):
        for item in Prefetch(source()):
            seen.append(item)
    assert seen == [1, 2]
    assert not _prefetch_threads()


def test_close_stops_a_producer_that_runs_ahead():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    with Prefetch(endless(), depth=2) as ahead:
        assert [next(ahead) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert not _prefetch_threads()
    assert len(produced) <= 5 + 2 + 1  # at most depth items ahead, plus the one it was putting
    with pytest.raises(StopIteration):
        next(ahead)

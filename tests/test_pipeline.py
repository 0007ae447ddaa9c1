"""replicator.pipeline: a stage on a second thread, in order, bounded, failures and early stops passed on."""
from __future__ import annotations

import threading
import time

import pytest

from replicator.pipeline import ahead, ahead_in


def test_ahead_keeps_order_and_stays_bounded():
    made = []

    def produce():
        for i in range(50):
            made.append(i)
            yield i
    it = ahead(produce(), depth=3)
    assert next(it) == 0
    time.sleep(0.1)
    assert len(made) <= 1 + 3 + 1             # the one taken, a full queue, one waiting to be put
    assert list(it) == list(range(1, 50))


def test_a_producer_failure_reaches_the_consumer_where_it_happened():
    def produce():
        yield 1
        yield 2
        raise ValueError("broken at 3")
    it = ahead(produce())
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(ValueError, match="broken at 3"):
        next(it)


def test_stopping_early_stops_the_producer_thread():
    before = threading.active_count()
    it = ahead(iter(range(10 ** 9)), depth=2, name="endless")
    assert next(it) == 0
    it.close()
    assert threading.active_count() == before


def test_ahead_in_reuses_its_buffers_and_keeps_a_result_until_the_next():
    bufs = [bytearray(4) for _ in range(3)]

    def fill(i, buf):
        buf[:] = bytes([i]) * 4
        return i, memoryview(buf)
    seen = set()
    for i, view in ahead_in(fill, range(40), bufs):
        time.sleep(0.001)                       # let the producer run ahead meanwhile
        assert bytes(view) == bytes([i]) * 4    # not overwritten while we hold it
        seen.add(id(view.obj))
    assert seen <= {id(b) for b in bufs}


def test_ahead_in_stopped_early_lets_its_thread_go():
    before = threading.active_count()
    it = ahead_in(lambda i, b: i, iter(range(10 ** 9)), [bytearray(1), bytearray(1)])
    assert next(it) == 0
    it.close()
    assert threading.active_count() == before

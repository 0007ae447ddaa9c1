"""Running one stage of a loop on a second thread: the producer's work (reading, decompressing, hashing)
and the consumer's (writing) overlap, since all of them release the GIL.

`ahead(iterable, depth)` yields what the iterable yields, computed on a thread at most `depth` items in
advance, so memory stays bounded by `depth` items. An exception in the producer is raised in the
consumer at the point it occurred; a consumer that stops early stops the producer too.

`ahead_in(work, items, buffers)` is the same for producers that fill reusable buffers (disk reads): a
result may be a view into its buffer, which is handed back when the consumer asks for the next result.
"""
from __future__ import annotations

import queue
import threading

_END = object()


def ahead(iterable, depth: int = 4, name: str = "ahead"):
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in iterable:
                if not _put(items, (item, None), stop):
                    return
            _put(items, (_END, None), stop)
        except BaseException as e:          # noqa: BLE001 -- handed to the consumer
            _put(items, (_END, e), stop)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, error = items.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():            # unblock a producer waiting for a free slot
            try:
                items.get_nowait()
            except queue.Empty:
                pass
            thread.join(0.01)


def _put(items: queue.Queue, entry, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            items.put(entry, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def ahead_in(work, items, buffers: list, name: str = "ahead"):
    """Yield work(item, buffer) for each item, computed on a thread with one of `buffers`; the result is
    valid until the next one is requested."""
    free: queue.Queue = queue.Queue()
    for b in buffers:
        free.put(b)
    stop = threading.Event()

    def produce():
        for item in items:
            buf = _get(free, stop)
            if buf is None:
                return
            yield work(item, buf), buf

    results = ahead(produce(), depth=len(buffers), name=name)
    held = None
    try:
        for result, buf in results:
            if held is not None:
                free.put(held)
            held = buf
            yield result
    finally:
        stop.set()
        results.close()


def _get(free: queue.Queue, stop: threading.Event):
    while not stop.is_set():
        try:
            return free.get(timeout=0.05)
        except queue.Empty:
            continue
    return None

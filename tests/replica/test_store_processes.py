"""One replica disk opened by two processes at once (the replica server and a `points export` or a seed
import): the second never tidies away the first's uploads in flight, and never runs or rolls back the
cycle the first is applying -- it waits for it and then sees its result."""
from __future__ import annotations

import multiprocessing
import os
import time
import uuid

from replicator.replica import ReplicaStore

SIZE = 8 << 20
DISK_ID = uuid.UUID("6c1f2b3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c")


def _hold(root: str, ready, release, exclusive: bool) -> None:
    """Another process with the disk open (and, with `exclusive`, in the middle of changing it)."""
    rd = ReplicaStore(root).disk(DISK_ID)
    if exclusive:
        with rd.exclusive():
            rd.state.counters["held"] = 1
            rd._save()
            ready.set()
            release.wait(30)
            rd.state.counters["held"] = 2
            rd._save()
    else:
        ready.set()
        release.wait(30)


def test_a_second_open_leaves_the_first_ones_uploads_alone(tmp_path):
    root = str(tmp_path)
    rd = ReplicaStore(root).ensure_disk(DISK_ID, SIZE)
    empty = rd.spool_path("e0e0")
    rd.close()
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold, args=(root, ready, release, False))
    other.start()
    assert ready.wait(30)
    open(empty, "wb").close()                     # an upload the other process just began
    ReplicaStore(root).disk(DISK_ID)              # while the other process has it open
    assert os.path.exists(empty)
    release.set()
    other.join(30)
    ReplicaStore(root).disk(DISK_ID)              # alone now: a dead empty upload goes
    assert not os.path.exists(empty)


def test_a_change_waits_for_the_other_process_and_starts_from_its_result(tmp_path):
    root = str(tmp_path)
    ReplicaStore(root).ensure_disk(DISK_ID, SIZE).close()
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold, args=(root, ready, release, True))
    other.start()
    assert ready.wait(30)
    ctx.Process(target=lambda: (time.sleep(0.5), release.set())).start()
    started = time.monotonic()
    mine = ReplicaStore(root).disk(DISK_ID)
    mine.count("mine")                            # waits until the other process is done
    assert time.monotonic() - started >= 0.4
    other.join(30)
    again = ReplicaStore(root).disk(DISK_ID)
    assert again.state.counters.get("held") == 2 and again.state.counters.get("mine") == 1   # no lost update


def test_opening_while_another_process_applies_does_not_wait(tmp_path):
    """Opens happen on the replica server's event loop: one must not wait for another process's apply."""
    root = str(tmp_path)
    ReplicaStore(root).ensure_disk(DISK_ID, SIZE).close()
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold, args=(root, ready, release, True))
    other.start()
    try:
        assert ready.wait(30)
        started = time.monotonic()
        ReplicaStore(root).disk(DISK_ID)
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
        other.join(30)

"""disk.spool: ordered file work on a thread below the caller's priority; a failure, even a bug's, is
raised to whoever waits next instead of leaving them waiting for ever."""
from __future__ import annotations

import os
import threading

import pytest

from replicator.disk.spool import Spool
from replicator.errors import DiskIOError
from replicator.priority import BACKGROUND_NICE


def nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_jobs_run_in_order_below_the_callers_priority(tmp_path):
    s = Spool(str(tmp_path / "f"), "write failed", 1 << 20)
    order, nice = [], []
    for k in range(50):
        s.put(lambda k=k: order.append(k), 10)
    s.put(lambda: nice.append(nice_of_this_thread()))
    s.wait()
    assert s.queued == 0 and s.idle
    s.stop()
    assert order == list(range(50))
    assert nice == [min(19, nice_of_this_thread() + BACKGROUND_NICE)]


def test_a_failure_is_kept_and_the_rest_dropped_but_the_last_job_runs(tmp_path):
    path = tmp_path / "dir"
    path.mkdir()
    s = Spool(str(path), "write failed", 1 << 20)
    ran, closed = [], threading.Event()
    s.put(lambda: open(path, "w"))                               # a real OSError: it is a directory
    s.put(lambda: ran.append(1))
    with pytest.raises(DiskIOError, match=r"dir: write failed: Is a directory$"):
        s.wait()
    with pytest.raises(DiskIOError, match="Is a directory"):
        s.put(lambda: ran.append(2))
    s.stop(last=closed.set)
    assert closed.wait(5) and ran == []


def test_a_bug_in_a_job_does_not_hang_the_waiter(tmp_path):
    s = Spool(str(tmp_path / "f"), "commit failed", 1)
    s.put(lambda: {}["missing"])
    with pytest.raises(DiskIOError, match=r"f: commit failed: KeyError: 'missing'"):
        s.wait()
    s.stop()

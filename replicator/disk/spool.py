"""Ordered file work on a thread of its own, so that the thread serving a guest never waits on the file
system.

Measured on the export under load (perf, off-CPU stacks of its loop thread): a 256 KiB log append waited
12-23 ms for the inode's block map (i_data_sem) while a writeback allocated blocks; a VHDX metadata commit
(three fsyncs) held the loop 5-9 ms. Both now run here. The first failure is kept: every later put() and
wait() raises it, and the work queued after it is dropped (what it belonged to is lost either way).
"""
from __future__ import annotations

import collections
import threading

from ..errors import DiskIOError, ReplicatorError
from ..priority import background_priority


class Spool:
    def __init__(self, path: str, what: str, max_bytes: int):
        """what: how a failure reads after the path ("log write failed"); max_bytes: the bytes queued
        before put() waits (a bound on memory when the device falls behind)."""
        self.path, self.what, self.max_bytes = path, what, max_bytes
        self.jobs: collections.deque = collections.deque()
        self.queued = 0                      # bytes in jobs not yet done
        self.busy = False
        self.error: str | None = None        # the first failure's message
        self.last = None
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="spool", daemon=True)
        self.thread.start()

    @property
    def idle(self) -> bool:
        return not self.jobs and not self.busy

    def put(self, job, nbytes: int = 0) -> None:
        with self.cv:
            while self.queued and self.queued + nbytes > self.max_bytes and self.error is None:
                self.cv.wait()               # the device is that far behind: the caller waits, bounded
            self._raise()
            self.jobs.append((job, nbytes))
            self.queued += nbytes
            self.cv.notify_all()

    def check(self) -> None:
        """Raises the first failure, if there was one."""
        with self.cv:
            self._raise()

    def cancel(self) -> None:
        """Drop the jobs not started yet (the `last` job of stop() still runs)."""
        with self.cv:
            self.queued -= sum(n for job, n in self.jobs if job is not None)
            self.jobs = collections.deque((job, n) for job, n in self.jobs if job is None)
            self.cv.notify_all()

    def join(self, timeout: float | None = None) -> None:
        """Until the thread has ended (after stop())."""
        self.thread.join(timeout)

    def wait(self) -> None:
        """Until every queued job is done; raises the first failure."""
        with self.cv:
            while (self.jobs or self.busy) and self.error is None:
                self.cv.wait()
            self._raise()

    def stop(self, last=None) -> None:
        """The thread ends after the jobs queued so far and then `last`, which runs even after a failure
        (not waited for)."""
        with self.cv:
            self.jobs.append((None, 0))
            self.last = last
            self.cv.notify_all()

    def _raise(self) -> None:
        if self.error is not None:
            raise DiskIOError(self.error)

    def _run(self) -> None:
        background_priority()
        while True:
            with self.cv:
                while not self.jobs:
                    self.cv.wait()
                job, nbytes = self.jobs.popleft()
                if job is None:
                    break
                self.busy = True
            err = None
            try:
                if self.error is None:
                    job()
            except ReplicatorError as e:
                err = e.message
            except OSError as e:
                err = f"{self.path}: {self.what}: {e.strerror or e}"
            except BaseException as e:       # a bug: said once, and nobody waits for ever
                err = f"{self.path}: {self.what}: {type(e).__name__}: {e}"
            with self.cv:
                self.busy = False
                self.queued -= nbytes
                if err is not None and self.error is None:
                    self.error = err
                self.cv.notify_all()
        try:
            if self.last is not None:
                self.last()
        finally:
            with self.cv:
                self.cv.notify_all()

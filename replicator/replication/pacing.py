"""How fast a copy read from a running disk goes while its guest writes (DRBD's c-min-rate, as an idea).

An initial copy or a resync reads, hashes, compresses and sends the disk as fast as the host allows: on a
2-core host about 150 MiB/s, and every core busy. A guest whose session shares the cores then waits for
them: measured with fio in a session of its own (as libvirt runs QEMU), 64 KiB writes at queue depth 16
saw a p99.9 of 11-15 ms during the copy at full speed and 4.7-8.4 ms with the copy held to 50 MiB/s
(qemu-nbd alone: 1.5-2.3 ms; bench/guest_impact.py, docs/performance.md). So while the guest writes, the
copy goes at `rate`; while it does not, at full speed. The guest's writes are counted by the export and come
with each answer about where the disk's data lives (the copy asks for every chunk it reads), so watching
them costs the export nothing more.
"""
from __future__ import annotations

import time
from typing import Callable

COPY_RATE_WHEN_BUSY = 50 << 20     # bytes per second: the default (protection key copy_rate_when_busy)
BUSY_HOLD = 1.0      # seconds after the last write seen during which the guest still counts as writing


class CopyPacer:
    """Called with the bytes of each chunk a copy has read; sleeps as long as the chunk should have taken
    at `rate` bytes per second if the guest wrote during the last BUSY_HOLD seconds."""

    def __init__(self, rate: int, writes: Callable[[], int | None], *, clock=time.monotonic, sleep=time.sleep):
        self.rate, self.writes, self.clock, self.sleep = rate, writes, clock, sleep
        self._seen: int | None = None
        self._busy_until = float("-inf")
        self._last = clock()
        self.slept = 0.0          # seconds held back in all (the job's statistics)

    def busy(self, now: float) -> bool:
        count = self.writes()
        if count is not None:
            if self._seen is not None and count != self._seen:
                self._busy_until = now + BUSY_HOLD
            self._seen = count
        return now < self._busy_until

    def __call__(self, nbytes: int) -> None:
        now = self.clock()
        if self.rate > 0 and self.busy(now):
            wait = nbytes / self.rate - (now - self._last)
            if wait > 0:
                self.sleep(wait)
                self.slept += wait
                now += wait
        self._last = now

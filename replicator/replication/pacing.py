"""How fast a copy read from a running disk goes while its guest writes (DRBD's c-min-rate, as an idea).

An initial copy or a resync reads, hashes, compresses and sends the disk as fast as the host allows: on a
2-core host about 150 MiB/s, and every core busy. A guest whose session shares the cores then waits for
them: measured with fio in a session of its own (as libvirt runs QEMU), 64 KiB writes at queue depth 16
saw a p99.9 of 11-15 ms during the copy at full speed and 4.7-8.4 ms with the copy held to 50 MiB/s
(qemu-nbd alone: 1.5-2.3 ms; bench/guest_impact.py, docs/performance.md). So while the guest writes, the
copy goes at `rate`; while it does not, at full speed. The export notes the time of the guest's last
write; the pacer asks it how long ago that was at most every POLL seconds (a control call the export answers
from that one number).

The log written during the copy is shipped right after it and is part of the same catching up (the replica
is not consistent before it is applied), so it goes at the same pace: shipped at full speed, it came as one
burst at the copy's end, where the guest waited up to 12 ms for a CPU (a perf sched capture). Later logs
are not held back: a guest writing faster than `rate` would otherwise outrun its replication for good.
"""
from __future__ import annotations

import time
from typing import Callable

COPY_RATE_WHEN_BUSY = 50 << 20     # bytes per second: the default (protection key copy_rate_when_busy)
BUSY_HOLD = 1.0      # seconds after the last write seen during which the guest still counts as writing
POLL = 0.25          # seconds between two questions to the export about the guest's last write


class CopyPacer:
    """Called with the bytes of each chunk a copy has read; sleeps as long as the chunk should have taken
    at `rate` bytes per second if the guest wrote during the last BUSY_HOLD seconds. `quiet()` gives the
    seconds since the guest's last write (None: it has not written, or nobody knows; never held back)."""

    def __init__(self, rate: int, quiet: Callable[[], float | None], *, clock=time.monotonic, sleep=time.sleep):
        self.rate, self.quiet, self.clock, self.sleep = rate, quiet, clock, sleep
        self._busy_until = float("-inf")
        self._polled = float("-inf")
        self._last = clock()
        self.slept = 0.0          # seconds held back in all (the job's statistics)

    def busy(self, now: float) -> bool:
        if now - self._polled >= POLL:
            self._polled = now
            quiet = self.quiet()
            self._busy_until = float("-inf") if quiet is None else now - quiet + BUSY_HOLD
        return now < self._busy_until

    def __call__(self, nbytes: int) -> None:
        now = self.clock()
        if self.rate > 0 and self.busy(now):
            now = self.clock()                    # the question may have waited for the export's answer
            wait = nbytes / self.rate - (now - self._last)
            if wait > 0:
                self.sleep(wait)
                self.slept += wait
                now += wait
        self._last = now

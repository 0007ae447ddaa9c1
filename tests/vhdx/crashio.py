"""A FileIO that dies at a chosen write, to prove the VHDX log makes every metadata update atomic.

Two crash models:
- "torn": writes reach the disk in order; the crashing write lands only a prefix of random length
  (whole 512-byte sectors). An fsync is a crash point too: the crash comes before it takes effect.
- "lose-unsynced": as torn, and then a random subset of the writes issued since the last fsync is
  rolled back, as a volatile disk cache may drop them in any order.
"""
from __future__ import annotations

import random

from replicator.vhdx.fileio import FileIO


class SimulatedCrash(Exception):
    pass


class CountingIO(FileIO):
    writes = 0

    def pwrite(self, data, offset):
        CountingIO.writes += 1
        super().pwrite(data, offset)

    def truncate(self, length):
        CountingIO.writes += 1
        super().truncate(length)

    def fsync(self):
        CountingIO.writes += 1
        super().fsync()


def crashing_io(crash_at: int, mode: str = "torn", seed: int = 0):
    state = {"n": 0}
    rng = random.Random(seed)

    class CrashingIO(FileIO):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.unsynced = []   # (offset, old bytes) or ("size", old size)

        def _remember(self, offset, length):
            self.unsynced.append((offset, self.pread(length, offset), self.size()))

        def _tick(self):
            state["n"] += 1
            return state["n"] == crash_at

        def pwrite(self, data, offset):
            data = bytes(data)
            if self._tick():
                cut = rng.randrange(0, max(1, len(data) // 512)) * 512
                self._remember(offset, cut)
                super().pwrite(data[:cut], offset)
                self._crash()
            self._remember(offset, len(data))
            super().pwrite(data, offset)

        def truncate(self, length):
            if self._tick():
                self._crash()
            self.unsynced.append((None, b"", self.size()))
            super().truncate(length)

        def fsync(self):
            if self._tick():
                self._crash()
            super().fsync()
            self.unsynced.clear()

        def _crash(self):
            if mode == "lose-unsynced":
                for offset, old, old_size in reversed(self.unsynced):
                    if rng.random() < 0.5:
                        continue
                    if offset is None:
                        if old_size < self.size():
                            FileIO.truncate(self, old_size)
                    else:
                        FileIO.pwrite(self, old, offset)
            self.close()
            raise SimulatedCrash(f"crash at write {crash_at}")

    return CrashingIO

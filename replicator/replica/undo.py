"""Undo logs: the old contents of every range a cycle overwrites, so earlier recovery points can be rebuilt.

An undo log is a Hyper-V Replica Log (same format, same reader): its writes, applied to the newer point,
give back the older one. Two consecutive undo logs merge into one when the point between them expires;
where both cover a range, the older point's contents win.
"""
from __future__ import annotations

import os

from ..disk.base import ExtentKind
from ..hrl import HrlReader, HrlWriter
from ..hrl.reader import LogWrite, coalesce

CHUNK = 4 << 20


class UndoCapture:
    """An undo log built range by range: commit captures all of a cycle's ranges at once, a precheck
    (precheck.py) frame by frame while the upload arrives."""

    def __init__(self, path: str):
        self.path = path
        self.writer = HrlWriter(path)

    def add(self, disk, offset: int, length: int) -> None:
        """The current contents of [offset, offset + length) of `disk`."""
        for ext in disk.extents(offset, length):
            if ext.kind is ExtentKind.ZERO:
                self.writer.append_zeroes(ext.offset, ext.length)
                continue
            for pos in range(ext.offset, ext.end, CHUNK):
                n = min(CHUNK, ext.end - pos)
                self.writer.append(pos, disk.read(pos, n))

    def seal(self) -> None:
        self.writer.seal()

    def abandon(self) -> None:
        self.writer.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def capture(disk, ranges, path: str) -> None:
    """Write to `path` the current contents of `ranges` ((offset, length) pairs) of `disk`, then seal it."""
    cap = UndoCapture(path)
    try:
        for offset, length in _union(ranges):
            cap.add(disk, offset, length)
        cap.seal()
    except BaseException:
        cap.writer.close()
        raise


def apply_undo(path: str, disk) -> None:
    """Rewind `disk` by one undo log (coalesced: each byte written once)."""
    with HrlReader(path, disk.size) as r:
        for ext in r.extents():
            for pos in range(0, ext.length, CHUNK):
                n = min(CHUNK, ext.length - pos)
                data = r.read_raw(ext.data_location + pos, n)
                if data.count(0) == n:
                    disk.write_zeroes(ext.offset + pos, n)
                else:
                    disk.write(ext.offset + pos, data)
    disk.flush()


def merge(newer: str, older: str, out: str) -> None:
    """One undo log equivalent to applying `newer` then `older`: `older`'s bytes win where both write."""
    with HrlReader(newer) as a, HrlReader(older) as b:
        tagged = [LogWrite(w.offset, w.length, w.data_location, 0, 0) for w in a.writes]
        shift = 1 << 62        # keep the two logs' data locations apart inside one coalesce
        tagged += [LogWrite(w.offset, w.length, w.data_location + shift, 0, 0) for w in b.writes]
        w = HrlWriter(out)
        try:
            for ext in coalesce(tagged):
                src, loc = (b, ext.data_location - shift) if ext.data_location >= shift else (a, ext.data_location)
                for pos in range(0, ext.length, CHUNK):
                    n = min(CHUNK, ext.length - pos)
                    data = src.read_raw(loc + pos, n)
                    if data.count(0) == n:
                        w.append_zeroes(ext.offset + pos, n)
                    else:
                        w.append(ext.offset + pos, data)
            w.seal()
        except BaseException:
            w.close()
            if os.path.exists(out):
                os.unlink(out)
            raise


def _union(ranges):
    """Sorted, merged (offset, length) pairs."""
    out: list[list[int]] = []
    for off, n in sorted(r for r in ranges if r[1] > 0):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + n - out[-1][0])
        else:
            out.append([off, n])
    return [(a, b) for a, b in out]

"""A guest's reads without a wait on the export's loop.

The loop serves every request of every disk of a machine. A read the page cache cannot answer waits for
the device, and while it waited on the loop, every other request of the machine waited behind it: a cold
read of one disk held up the writes of all of them (during an initial copy or a resync, when the device is
busiest, for tens of milliseconds). qemu-nbd reads on a pool of threads for the same reason.

So a read is done in two parts. On the loop: where each range lives (the VHDX's BAT), zeros for what has
no payload, and the file's cached pages (preadv with RWF_NOWAIT, which returns what the page cache holds
and never waits for the device). On a worker thread: whatever is left, with ordinary reads. The worker
touches nothing but the file: the disk's tables are read on the loop, between requests, as before.

A block's place in the file never changes while the export has it open (trimmed blocks' space is not
reused), so a plan made on the loop stays right while the worker reads. A read that overlaps a write in
flight at the same time may see either, which NBD allows: a client that needs an order waits for the reply.
"""
from __future__ import annotations

import errno
import os

from ..disk.base import pread_exact
from ..disk.raw import RawDisk
from ..vhdx import VhdxDisk
from ..vhdx.fileio import FileIO

NOWAIT = getattr(os, "RWF_NOWAIT", 0)
WARM_STEP = 1 << 20                     # NBD_CMD_CACHE reads through a buffer this large


class FileReads:
    """Reads of one disk's ranges from its file: at once what needs no wait, the rest handed back.

    `disk` is what the export serves (a TrackedDisk, or a VhdxDisk or RawDisk itself); reads_for() says
    whether a disk can be read this way at all."""

    def __init__(self, disk):
        self.disk = disk
        self.nowait = NOWAIT            # cleared for good where the file system refuses it

    def _inner(self):
        return getattr(self.disk, "disk", self.disk)        # a TrackedDisk's VhdxDisk (None once closed)

    def _plan(self, offset: int, length: int):
        """(fd, [(virtual offset, length, kind, file offset)]) of the range; fd None when the disk is closed."""
        inner = self._inner()
        if isinstance(inner, VhdxDisk):
            return inner.io.fd, inner.map_range(offset, length)
        if isinstance(inner, RawDisk):
            return inner.fd, [(offset, length, "file", offset)]
        return None, []

    def now(self, offset: int, view: memoryview) -> list[tuple[memoryview, int, int]]:
        """Fill `view`, the disk's bytes from `offset`, with what needs no wait for the device. Returns
        what is left as (piece of view, file descriptor, file offset), for wait()."""
        fd, plan = self._plan(offset, len(view))
        if fd is None:                          # closed meanwhile: the disk's own read says so
            self.disk.readinto(offset, view)
            return []
        left = []
        for voff, n, kind, foff in plan:
            piece = view[voff - offset:voff - offset + n]
            if kind == "zero":
                piece[:] = bytes(n)
            elif kind == "file":
                done = self._cached(fd, piece, foff)
                if done < n:
                    left.append((piece[done:], fd, foff + done))
            else:                               # partly present, or in a parent: the disk's own read
                self.disk.readinto(voff, piece)
        return left

    def file_pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """For NBD_CMD_CACHE: what of the range lies in the file, as (fd, file offset, length) for warm().
        What the disk reads from elsewhere (partly present blocks, a parent) is read here and now."""
        fd, plan = self._plan(offset, length)
        if fd is None:
            plan = [(offset, length, "other", 0)]
        out = []
        for voff, n, kind, foff in plan:
            if kind == "file":
                out.append((fd, foff, n))
            elif kind != "zero":
                read_through(self.disk, voff, n)
        return out

    def _cached(self, fd: int, piece: memoryview, foff: int) -> int:
        """How much of `piece` the page cache gave (the end of the file reads as zeros)."""
        if not self.nowait:
            return 0
        done = 0
        while done < len(piece):
            try:
                n = os.preadv(fd, [piece[done:]], foff + done, self.nowait)
            except BlockingIOError:
                return done
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self.nowait = 0             # no RWF_NOWAIT here: every read that is not zeros waits off the loop
                    return done
                raise
            if n == 0:                          # a block cut short by truncation: zeros past the end
                piece[done:] = bytes(len(piece) - done)
                return len(piece)
            done += n
        return done

    @staticmethod
    def warm(pieces: list[tuple[int, int, int]]) -> None:
        """Read file_pieces() into the page cache, through one small buffer (on a worker thread)."""
        buf = memoryview(bytearray(WARM_STEP))
        for fd, foff, n in pieces:
            for pos in range(foff, foff + n, WARM_STEP):
                k = min(WARM_STEP, foff + n - pos)
                if pread_exact(fd, buf[:k], pos) < k:
                    break                       # the end of the file

    @staticmethod
    def wait(left: list[tuple[memoryview, int, int]]) -> None:
        """The reads now() left, waiting for the device (on a worker thread)."""
        for piece, fd, foff in left:
            got = pread_exact(fd, piece, foff)
            if got < len(piece):
                piece[got:] = bytes(len(piece) - got)


def read_through(disk, offset: int, length: int) -> None:
    """Read [offset, offset+length) of the disk into the page cache, through one WARM_STEP buffer (NBD_CMD_CACHE
    of what cannot be read from the file directly), on the calling thread."""
    buf = memoryview(bytearray(min(WARM_STEP, length)))
    for pos in range(offset, offset + length, WARM_STEP):
        disk.readinto(pos, buf[:min(WARM_STEP, offset + length - pos)])


def reads_for(disk) -> FileReads | None:
    """FileReads for a disk whose data lies in one file this process holds open (a VHDX or a raw file,
    tracked or not); None for anything else, which is read on the loop as before."""
    inner = getattr(disk, "disk", disk)
    if isinstance(inner, VhdxDisk) and isinstance(inner.io, FileIO):
        return FileReads(disk)
    if isinstance(inner, RawDisk):
        return FileReads(disk)
    return None

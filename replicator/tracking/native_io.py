"""The export's native request path for one tracked disk: kernels.NbdExport bound to its state.

A guest's plain write into a block the VHDX already holds, in a region already marked this cycle, with a
log to record it in, is the common case of an export under load; C serves a run of those (the disk
write, the log's entry and data staged in the HrlWriter's own buffers, the reply) and this side does the
bookkeeping once per run. A read of such blocks is the other common case: C copies the data into its reply
(one OFFSET_DATA chunk with structured replies) when the page cache holds it, and otherwise queues it on the
server's read pool (kernels.ReadPool), whose threads read it and whose replies the loop takes in batches
(tracking/nbd.py). Everything else (the first write to a region in a cycle, a new block, FUA, zeroes,
structured reads with hole chunks, errors) goes through the Python path in tracking/nbd.py as before, and a
request C stops at is served there. Measured on this project's machine: a 4 KiB write cost the loop about 15
us of Python around a 3 us pwrite; see docs/performance.md.

The two paths must give the same bytes: tests/tracking/test_native_writes.py replays the logs of one
against the other, tests/tracking/test_native_reads.py compares the replies.
"""
from __future__ import annotations

import logging

from .. import kernels
from ..errors import ReplicatorError
from ..hrl.writer import BUFFER
from ..vhdx import VhdxDisk
from ..vhdx.fileio import FileIO

_log = logging.getLogger("replicator.nbd")


class NativeIO:
    def __init__(self, tracked, reads: bool = True, sparse_from: int = 0):
        self.tracked = tracked
        self.reads = reads
        disk: VhdxDisk = tracked.disk
        self.native = kernels.NbdExport()
        self.native.bind_disk(disk.io.fd, disk.size, disk.bat, disk.geometry.block_size, disk.layout.chunk_ratio,
                              BUFFER - 1,     # as HrlWriter.append: longer writes go to the log file directly
                              sparse_from)
        self._bat, self._fd = disk.bat, disk.io.fd
        self._marked = None
        self._log = None
        self._mode: tuple[bool, bool] | None = None       # (writes, structured) as last set in C
        self.served = 0                 # requests served here (a figure for tests and profiles)
        self.reads_served = 0           # of which reads (reads_queued of them on the read pool's threads)
        self.reads_queued = 0
        self.queued = (0, 0)            # the last call's reads queued on the pool, and their replies' bytes
        self.pool = None

    def bind_pool(self, pool) -> None:
        """Reads of pages not cached go to `pool` (a kernels.ReadPool; None: to the Python path)."""
        if pool is not self.pool:
            self.native.bind_pool(pool)
            self.pool = pool

    @classmethod
    def for_disk(cls, tracked, reads: bool = True, sparse_from: int = 0) -> "NativeIO | None":
        """None where the native path does not apply: no native kernels, a differencing disk (partial
        sectors and parents' blocks), or a disk whose file is read through something else than FileIO.
        sparse_from: structured reads this long with zeros in them are left to the Python path (which sends
        the zeros as hole chunks)."""
        disk = getattr(tracked, "disk", None)
        if (kernels.NbdExport is None or not isinstance(disk, VhdxDisk) or disk.read_only
                or disk.parent is not None or type(disk.io) is not FileIO):
            return None
        return cls(tracked, reads, sparse_from)

    def serve(self, data, pos: int, structured: bool, token: int = 0, room: int = 0,
              room_bytes: int = 0) -> tuple[int, int, bytes, bool]:
        """(where the first request not served starts, how many were served, their replies, whether C
        stopped for want of reply room only). structured: the connection's reply form for reads. Reads of
        pages not cached go to the bound pool with `token`, up to `room` of them and `room_bytes` of replies;
        `queued` then says how many went."""
        self.queued = (0, 0)
        t = self.tracked
        log, disk = t.log, t.disk
        if disk is None or disk.bat is not self._bat or disk.io.fd != self._fd:
            return pos, 0, b"", False   # closed, or opened again: C's file and block map are not its own
        # writes need a log, and the session's first write (new GUIDs) is Python's
        writes = log is not None and disk._data_guid_changed
        if not writes and not self.reads:
            return pos, 0, b"", False
        if (writes, structured) != self._mode:
            self.native.modes(writes, self.reads, structured)
            self._mode = (writes, structured)
        log_len = entries_n = 0
        if writes:
            if log is not self._log:
                self.native.bind_log(log._buf, log.pending, log.per_block)
                self._log = log
            if t._marked is not self._marked:
                self.native.bind_regions(t._marked, t.state.region_size)
                self._marked = t._marked
            log_len, entries_n = log._buf_len, log.pending_n
        end, served, nbytes, log_len, entries_n, replies, _ = self.native.serve(data, pos, log_len, entries_n,
                                                                                token, room, room_bytes)
        if served:
            self.served += served
            self.reads_served += self.native.reads_served
            if self.pool is not None:
                self.queued = self.native.queued
                self.reads_queued += self.queued[0]
            if nbytes:
                t.written_natively(nbytes, log_len, entries_n)
                if disk._dirty_count():
                    self._commit_due(disk)
        return end, served, replies, self.native.full

    @staticmethod
    def _commit_due(disk: VhdxDisk) -> None:
        """What each write on the Python path does after its data (io_path._write_piece): hand the block
        map's pending changes to a commit once they pass the mark. A commit that failed before is not
        answered here (these writes are answered already): it stays pending, and the next flush reports it."""
        try:
            disk._maybe_commit()
        except ReplicatorError as e:
            _log.error("%s: metadata commit failed: %s", disk.path, e.message)

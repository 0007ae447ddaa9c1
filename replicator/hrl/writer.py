"""Writing a Hyper-V Replica Log the way Hyper-V lays it out.

Layout: the header (EOLLocation 0 while the log is open), an empty first metadata block, then for each
batch the data entries followed by the metadata block describing them. `commit()` closes the current
batch (and with durable=True flushes it); `seal()` writes the final header with EOLLocation, which is
what makes the log readable: an unsealed log is by definition not closed cleanly.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
import uuid

from ..disk.base import pwrite_all
from ..disk.copy import copy_range_sparse
from ..disk.raw import zero_range
from ..disk.spool import Spool
from ..errors import DiskIOError
from .format import (DEFAULT_METADATA_SIZE, ENTRY_SIZE, HEADER_SIZE, VERSION_2, LogHeader, checksum,
                     entries_per_block, hrl_time, pack_entry_into, pack_metadata)


BUFFER = 256 << 10                     # appended data is written in pieces of about this size
GROW = 64 << 20                       # the file is extended this far ahead of the log's end
ZERO_PIECE = 1 << 30                  # DataLength is 32 bits: zero runs are logged in 1 GiB pieces
ZERO_CHECKSUM = 0xFFFFFFFF            # the one's complement of a sum of zero bytes
SPOOL_MAX = 64 << 20                  # a background writer's queued bytes before an append waits for it
SPILL_PIECE = 1 << 20                 # a log moving to another file (spill_to): copied in pieces of this size


def take_spare(spare: str, path: str) -> int:
    """Open the spare log file `spare` as the new log `path` (-1 when there is none).

    Why: a new file's pages are fresh page-cache memory, and on a virtual machine whose free memory went
    back to the host each fresh page costs a fault in the host; writing the appends into such pages was
    measured 20x slower than over pages a file already holds (343 against 7,065 MiB/s). A shipped log's
    file, kept as the spare, keeps its pages and its blocks. The new header goes over the old one at once;
    a crash before that leaves the old bytes under the new name, which nothing trusts: a tracker that
    stopped without a clean shutdown resyncs, and the state names only sealed logs."""
    try:
        fd = os.open(spare, os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:                       # none, or not ours to write over (a symlink, a directory)
        return -1
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or os.path.lexists(path):
            raise FileExistsError(path)
        os.rename(spare, path)
    except OSError:
        os.close(fd)
        return -1
    return fd


class HrlWriter:
    def __init__(self, path: str, *, previous_unique_id: uuid.UUID = uuid.UUID(int=0),
                 vhd2_data_write_guid: uuid.UUID = uuid.UUID(int=0), metadata_size: int = DEFAULT_METADATA_SIZE,
                 unique_id: uuid.UUID | None = None, recycle: str | None = None, background: bool = False,
                 overflow: str | None = None):
        """recycle: an old log file to write this one over, if it exists (see take_spare).
        overflow: where the log moves (spill_to) when its file system is full (a log in memory: tmpfs).
        background: the file work (creating, writing, growing) runs in order on a thread of its own
        (disk.spool); a failure is raised by a later append, commit() or seal()."""
        self.path = path
        self.file_end = 0                     # the file's size: past the log's end only until the seal
        self.stale_end = 0                    # a recycled file holds the old log's bytes up to here
        self.fd = -1
        now = hrl_time(time.time())
        self.metadata_size = metadata_size
        self.per_block = entries_per_block(metadata_size)
        self.header = LogHeader(version=VERSION_2, timestamp=now, original_size=HEADER_SIZE + metadata_size,
                                current_size=HEADER_SIZE + metadata_size, metadata_size=metadata_size,
                                unique_id=unique_id or uuid.uuid4(), previous_unique_id=previous_unique_id,
                                last_modified_timestamp=now, vhd2_data_write_guid=vhd2_data_write_guid)
        self.pending = bytearray(self.per_block * ENTRY_SIZE)  # the batch's metadata entries, packed
        self.pending_n = 0
        self.total_entries = 0
        self.data_bytes = 0
        self.last_metadata = HEADER_SIZE
        self.written_end = 0                  # bytes below this are written for good (the log is append-only)
        self._spill: _Spill | None = None     # the log moving to another file (spill_to)
        self.spilling = False                 # spill_to() asked (the caller's view)
        self.spilled = False                  # the move is done (set by the writer's thread)
        self.spill_error: str | None = None   # why a move was given up
        self._overflow = overflow
        self._spool = Spool(path, "log write failed", SPOOL_MAX) if background else None
        self._closing = None
        self._opened = threading.Event()     # set once the file is open (or given up): see wait_open
        self._do(lambda: self._open(recycle))
        try:
            self._write(self.header.pack(), 0)
            self._write(pack_metadata(0, b"", 0, metadata_size), HEADER_SIZE)   # as Hyper-V: an empty first block
        except DiskIOError:
            if self._spool is None:
                raise
            # the open failed on the spool's thread already: as documented, the spool keeps the error for the
            # next append, commit() or seal() to raise, not this constructor (which lost the race to it)
        self.cursor = HEADER_SIZE + metadata_size
        self.sealed = False
        # appended data not yet written: _buf[:_buf_len], from _buf_at in the log to the cursor. A fixed
        # buffer (it never moves: the export's native write path stages into it as well)
        self._buf = bytearray(BUFFER)
        self._buf_len = 0
        self._buf_at = self.cursor

    def wait_open(self) -> None:
        """Until the file is open (or the log given up): a background writer takes the spare on its own
        thread, in two steps (open, rename), and the spare must not be replaced in between."""
        self._opened.wait()

    def _open(self, recycle: str | None) -> None:
        try:
            self._take_or_create(recycle)
        finally:
            self._opened.set()

    def _take_or_create(self, recycle: str | None) -> None:
        fd = take_spare(recycle, self.path) if recycle else -1
        if fd >= 0:
            self.file_end = self.stale_end = os.fstat(fd).st_size
        else:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as e:
                raise DiskIOError(f"{self.path}: cannot create log: {e.strerror}") from None
        self.fd = fd

    def _do(self, job, nbytes: int = 0) -> None:
        """File work: on the spool's thread, in order, or here and now."""
        if self._spool is not None:
            self._spool.put(job, nbytes)
        else:
            job()

    @property
    def unique_id(self) -> uuid.UUID:
        return self.header.unique_id

    @property
    def size(self) -> int:
        return self.cursor

    def append(self, disk_offset: int, data) -> None:
        """Record one write: its data now, its metadata entry with the batch."""
        mv = memoryview(data).cast("B")
        n = len(mv)
        if n >= BUFFER:
            self._drain()
            # the caller may reuse its buffer once we return: a queued write keeps its own copy
            self._write(mv if self._spool is None or isinstance(mv.obj, bytes) else bytes(mv), self.cursor)
        else:                                # small writes leave in batches: one pwrite, not one each
            if self._buf_len + n > BUFFER:
                self._drain()
            if not self._buf_len:
                self._buf_at = self.cursor
            self._buf[self._buf_len:self._buf_len + n] = mv
            self._buf_len += n
        self.cursor += n
        self.data_bytes += n
        self._entry(disk_offset, n, checksum(mv))

    def _entry(self, disk_offset: int, length: int, data_checksum: int) -> None:
        pack_entry_into(self.pending, self.pending_n * ENTRY_SIZE, disk_offset, length, hrl_time(time.time()),
                        data_checksum)
        self.pending_n += 1
        if self.pending_n == self.per_block:
            self.commit()

    def staged(self, buf_len: int, pending_n: int) -> None:
        """The native write path appended to _buf (now filled to buf_len) and to pending (pending_n
        entries), never past their ends; what append does after that follows here."""
        nbytes = buf_len - self._buf_len
        if not nbytes:
            return
        if not self._buf_len:                # the stage was empty: its data starts at the cursor
            self._buf_at = self.cursor
        self._buf_len = buf_len
        self.cursor += nbytes
        self.data_bytes += nbytes
        self.pending_n = pending_n
        if pending_n == self.per_block:
            self.commit()
        elif buf_len >= BUFFER:
            self._drain()

    def append_zeroes(self, disk_offset: int, length: int) -> None:
        """Record zeroing as writes of zeros (MS-HRL knows only writes). The zeros are a hole in the log
        file: they cost no space and read back as zeros. In a recycled file the old log's bytes are
        zeroed first (a hole punched where the file system can)."""
        self._drain()
        while length:
            n = min(length, ZERO_PIECE)
            self._do(lambda at=self.cursor, n=n: self._zero_stale(at, n))   # each piece where it lands:
            self.cursor += n                                                 # a metadata block may come between
            self._entry(disk_offset, n, ZERO_CHECKSUM)
            disk_offset += n
            length -= n

    def commit(self, durable: bool = False) -> None:
        """Write the metadata block for the pending entries; durable=True also flushes the log."""
        self._drain()
        if self.pending_n:
            block = pack_metadata(self.cursor - self.last_metadata, self.pending, self.pending_n, self.metadata_size)
            self._write(block, self.cursor)
            self.last_metadata = self.cursor
            self.cursor += self.metadata_size
            self.total_entries += self.pending_n
            self.pending_n = 0
        if durable:
            if self._spool is not None:
                self._spool.wait()
            self._fsync()

    def seal(self, vhd2_data_write_guid: uuid.UUID | None = None, durable: bool = True) -> LogHeader:
        """Close the log cleanly: EOLLocation set, checksums written, flushed. The disk's DataWriteGuid as
        of the seal is recorded so that a later change made without tracking can be detected.
        durable=False leaves the flushing to the kernel, for a log whose loss in a crash costs a resync
        anyway (a running tracker's: see TrackedDisk.cut)."""
        self.commit()
        if self._spool is not None:
            try:
                self._spool.wait()
            finally:
                self._spool.stop()
                self._spool = None
            # the thread is done with the file once wait() returned: only its exit is left
        if self._spill is not None:
            self._spill_finish()
        if vhd2_data_write_guid is not None:
            self.header = self.header.evolve(vhd2_data_write_guid=vhd2_data_write_guid)
        self.header = self.header.evolve(current_size=self.cursor, eol_location=self.cursor,
                                         last_modified_timestamp=hrl_time(time.time()),
                                         total_metadata_entries=self.total_entries)
        if self.file_end > self.cursor:     # recycled or grown ahead: the log is exactly its bytes
            try:
                os.ftruncate(self.fd, self.cursor)
            except OSError as e:
                raise DiskIOError(f"{self.path}: log write failed: {e.strerror}") from None
            self.file_end = self.cursor
        if durable:
            self._fsync()                 # data and metadata before the header that vouches for them
        self._write(self.header.pack(), 0)
        if durable:
            self._fsync()
        self.sealed = True
        self.close()
        return self.header

    def spill_to(self, path: str) -> None:
        """Move the log, while it is being written, to a new file at `path` (a log written to memory that
        outgrew its budget goes on on disk: tracking/memlogs.py). Nothing waits for it: the writer's own
        thread copies what is written in pieces after each of its writes, and switches to the new file once
        it has caught up; the old file is then removed. seal() and close() finish or drop a move under way.
        A move that fails (no room on disk) is dropped, and the log stays where it is (spill_error says why)."""
        if self.spilling or self.sealed:
            return
        self.spilling = True
        self._do(lambda: self._spill_open(path))

    def _spill_open(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            self.spill_error = f"{path}: cannot create log: {e.strerror}"
            return
        self._spill = _Spill(path, fd)
        self._spill_step(0)

    def _spill_step(self, written: int) -> None:
        """After a write of `written` bytes: copy at least twice that (and a piece) of the old file, so that
        the move catches up with any append rate the writer sustains."""
        sp = self._spill
        allowance = max(SPILL_PIECE, 2 * written)
        try:
            while sp.copied < self.written_end and allowance > 0:
                n = min(SPILL_PIECE, self.written_end - sp.copied, allowance)
                got = copy_range_sparse(self.fd, sp.fd, sp.copied, n)     # logged zeroes stay holes
                if not got:
                    break
                sp.copied += got
                allowance -= got
            if sp.copied >= self.written_end:
                os.ftruncate(sp.fd, self.file_end)
        except OSError as e:                    # the old file is whole and still the log's: go on there
            self.spill_error = f"{sp.path}: log write failed: {e.strerror}"
            self._spill_drop()
            return
        if sp.copied >= self.written_end:
            old_fd, old_path = self.fd, self.path
            self.fd, self.path, self.stale_end, self._spill = sp.fd, sp.path, 0, None
            self.spilled = True
            os.close(old_fd)
            with contextlib.suppress(OSError):
                os.unlink(old_path)

    def _spill_finish(self) -> None:
        while self._spill is not None:
            self._spill_step(1 << 62)

    def _spill_drop(self) -> None:
        sp, self._spill = self._spill, None
        if sp is not None:
            os.close(sp.fd)
            try:
                os.unlink(sp.path)
            except OSError:
                pass

    def _drain(self) -> None:
        if self._buf_len:
            piece = memoryview(self._buf)[:self._buf_len]
            self._write(piece if self._spool is None else bytes(piece), self._buf_at)   # a queued write: a copy
            self._buf_len = 0

    def close(self, discard: bool = False) -> None:
        """Without waiting: a background writer's queued work is done (or dropped after a failure, or
        with `discard`, for a log given up) first; join() waits for its thread."""
        if self._spool is not None:
            if discard:
                self._spool.cancel()
            self._spool.stop(last=self._close)
            self._closing, self._spool = self._spool, None
        else:
            self._close()

    def join(self) -> None:
        """Until a background writer has let go of the file (after close())."""
        if self._closing is not None:
            self._closing.join()

    def _close(self) -> None:
        self._opened.set()
        self._spill_drop()                  # a move not finished: the log stays where it was (or goes, given up)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _zero_stale(self, at: int, n: int) -> None:
        if at < self.stale_end:
            try:
                zero_range(self.fd, at, min(n, self.stale_end - at))
            except OSError as e:
                raise DiskIOError(f"{self.path}: log write failed: {e.strerror}") from None

    def _write(self, data, offset: int) -> None:
        self._do(lambda: self._pwrite(data, offset), len(data))

    def _pwrite(self, data, offset: int) -> None:
        end = offset + len(data)
        try:
            self._pwrite_here(data, offset)
        except OSError as e:
            if not (e.errno == errno.ENOSPC and self._move_now()):
                raise DiskIOError(f"{self.path}: log write failed: {e.strerror}") from None
            try:                            # the whole write again, in the new file
                self._pwrite_here(data, offset)
            except OSError as e:
                raise DiskIOError(f"{self.path}: log write failed: {e.strerror}") from None
        self.written_end = max(self.written_end, end)
        if self._spill is not None:
            self._spill_step(len(data))

    def _pwrite_here(self, data, offset: int) -> None:
        end = offset + len(data)
        if end > self.file_end:
            # The file grows in steps, not with every append, so that appends do not change its size
            # (an inode update can wait while a writeback writes the inode out). Not measured alone.
            self.file_end = end + GROW
            os.ftruncate(self.fd, self.file_end)
        pwrite_all(self.fd, data, offset)

    def _move_now(self) -> bool:
        """The log's file system is full: move the log to `overflow` at once (on this thread; what is
        written so far is copied, the write that failed is made again there). Whether it moved."""
        if self._overflow is None or self.spilled:
            return False
        self.spilling = True
        if self._spill is None:
            self._spill_open(self._overflow)
        self._spill_finish()
        return self.spilled

    def _fsync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise DiskIOError(f"{self.path}: log flush failed: {e.strerror}") from None


class _Spill:
    """A log's move to another file: the new file, and how far the old one is copied into it."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd, self.copied = path, fd, 0

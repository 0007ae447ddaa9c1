"""The file underneath a VHDX: every byte the engine reads or writes passes through here.

Keeping all I/O in one small class lets the crash-safety harness stand in for it and stop the engine
after any single write, tearing that write, to prove the log keeps the file consistent.
"""
from __future__ import annotations

import errno
import os

from ..disk.base import pread_exact, pwrite_all
from ..disk.locks import lock_image
from ..errors import DiskIOError


class FileIO:
    def __init__(self, path: str, writable: bool, create: bool = False):
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        self.path = path
        self.writable = writable
        try:
            self.fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise DiskIOError(f"{path}: cannot open: {e.strerror}") from None
        if writable:                    # QEMU's image locks: nobody else may write or lock out writers
            try:
                lock_image(self.fd, path, write=True)
            except BaseException:
                os.close(self.fd)
                self.fd = -1
                raise

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def pread(self, length: int, offset: int) -> bytes:
        """Bytes at [offset, offset+length); short only at end of file."""
        buf = bytearray(length)
        n = self._io(pread_exact, self.fd, memoryview(buf), offset)
        return bytes(buf[:n])

    def readinto(self, buf: memoryview, offset: int) -> int:
        return self._io(pread_exact, self.fd, buf, offset)

    def pwrite(self, data, offset: int) -> None:
        self._io(pwrite_all, self.fd, data, offset)

    def truncate(self, length: int) -> None:
        self._io(os.ftruncate, self.fd, length)

    def fsync(self) -> None:
        self._io(os.fsync, self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _io(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            what = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
            raise DiskIOError(f"{self.path}: {fn.__name__}: {what}") from None


class DirectWriteIO(FileIO):
    """FileIO whose large aligned writes bypass the page cache (O_DIRECT on a second descriptor).

    For the replica's apply: a cycle writes each block once and nothing reads it back soon, so caching it
    only costs the allocation of a page per 4 KiB (on a virtual machine whose free memory went back to the
    host, that alone is several times the cost of the device write). Small or unaligned writes, and every
    read, use the ordinary descriptor; Linux keeps the two coherent. Where O_DIRECT is refused (tmpfs), all
    writes are ordinary. fsync() on the ordinary descriptor also flushes the device cache for both."""

    ALIGN = 4096
    MIN_DIRECT = 64 << 10
    CHUNK = 4 << 20

    def __init__(self, path: str, writable: bool, create: bool = False):
        super().__init__(path, writable, create)
        self.direct_fd = -1
        self._buf = None
        if writable and hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                self.direct_fd = -1

    def pwrite(self, data, offset: int) -> None:
        mv = memoryview(data).cast("B")
        n = len(mv)
        if self.direct_fd < 0 or n < self.MIN_DIRECT or offset % self.ALIGN or n % self.ALIGN:
            return super().pwrite(mv, offset)
        if self._buf is None:
            import mmap
            self._buf = mmap.mmap(-1, self.CHUNK)            # page-aligned, reused for every write
        failed = self._write_direct(mv, offset)
        if failed is not None:      # raised here, outside the handler: no traceback keeps a view of the buffer
            raise DiskIOError(failed)

    def _write_direct(self, mv: memoryview, offset: int) -> str | None:
        """Copy through the aligned buffer and write; the error's message, or None. Every view of the
        buffer is released before this returns, so the buffer can always be closed."""
        pos, n = 0, len(mv)
        with memoryview(self._buf) as aligned:
            while pos < n:
                k = min(self.CHUNK, n - pos)
                with aligned[:k] as piece:
                    piece[:] = mv[pos:pos + k]
                    try:
                        self._io(pwrite_all, self.direct_fd, piece, offset + pos)
                    except DiskIOError as e:
                        e.__traceback__ = None
                        return e.message
                pos += k
        return None

    def close(self) -> None:
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1
        if self._buf is not None:
            buf, self._buf = self._buf, None
            try:
                buf.close()
            except BufferError:     # a view still held somewhere: the mapping goes with its last reference
                pass
        super().close()

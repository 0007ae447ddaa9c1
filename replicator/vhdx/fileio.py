"""The file underneath a VHDX: every byte the engine reads or writes passes through here.

Keeping all I/O in one small class lets the crash-safety harness stand in for it and stop the engine
after any single write, tearing that write, to prove the log keeps the file consistent.
"""
from __future__ import annotations

import errno
import os

from ..disk.base import pread_exact, pwrite_all
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

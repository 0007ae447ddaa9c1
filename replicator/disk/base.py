"""The one small interface every disk format sits behind (as formats sit behind qemu's block drivers).

A driver exposes a virtual disk of `size` bytes with byte-granular read/write/trim/zeroing; callers never
see the container layout. `extents()` reports which virtual ranges hold data so that copy, hash and ship
loops skip unallocated space instead of reading zeros.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Iterator

from ..errors import OutOfRange, ReadOnlyError


class ExtentKind(enum.Enum):
    DATA = "data"   # bytes live in this image (or its parent chain) and must be read
    ZERO = "zero"   # reads as zeros without touching storage


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    kind: ExtentKind

    @property
    def end(self) -> int:
        return self.offset + self.length


class FileSync:
    """A flush's second half that is one fsync of `fd` (and nothing of Python's): callable on any thread,
    and what the export's C read threads can run themselves (tracking/nbd.py)."""

    __slots__ = ("fd", "_sync")

    def __init__(self, fd: int, sync):
        self.fd, self._sync = fd, sync

    def __call__(self) -> None:
        self._sync()


class BlockDevice:
    """Base class of the disk drivers (raw, VHD, VHDX). Subclasses implement the `_`-prefixed methods."""

    format_name = "?"
    size: int = 0
    logical_sector_size: int = 512
    physical_sector_size: int = 512
    read_only: bool = True
    path: str = ""

    # ---- public API: range checks live here once, drivers get clean requests ----
    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset: int, buf) -> None:
        mv = memoryview(buf).cast("B")
        self._check_range(offset, len(mv))
        if len(mv):
            self._readinto(offset, mv)

    def write(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        self._check_writable()
        self._check_range(offset, len(mv))
        if len(mv):
            self._write(offset, mv)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros, deallocating where the format allows."""
        self._check_writable()
        self._check_range(offset, length)
        if length:
            self._write_zeroes(offset, length)

    def trim(self, offset: int, length: int) -> None:
        """Discard a range. replicator drivers always make trimmed ranges read as zeros, so a replica and
        its primary never disagree about what a discarded sector contains."""
        self.write_zeroes(offset, length)

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Cover [offset, offset+length) with DATA and ZERO extents, in order, adjacent ones merged."""
        if length is None:
            length = self.size - offset
        self._check_range(offset, length)
        pending: Extent | None = None
        for ext in self._extents(offset, length):
            if pending is not None and pending.kind == ext.kind and pending.end == ext.offset:
                pending = Extent(pending.offset, pending.length + ext.length, ext.kind)
                continue
            if pending is not None:
                yield pending
            pending = ext
        if pending is not None:
            yield pending

    def flush(self) -> None:
        pass

    def flush_begin(self):
        """flush() in two halves, for a caller that must not wait on the device (the export's loop): this
        one, cheap, on the calling thread, and the one it returns, for any thread, which makes every write
        made before this call durable (a FileSync where that is one fsync of a file). None: there is no
        second half; call flush() itself."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- driver hooks ----
    def _readinto(self, offset: int, buf: memoryview) -> None:
        raise NotImplementedError

    def _write(self, offset: int, data: memoryview) -> None:
        raise NotImplementedError

    def _write_zeroes(self, offset: int, length: int) -> None:
        zeros = bytes(min(length, 1 << 20))
        pos = offset
        while pos < offset + length:
            n = min(len(zeros), offset + length - pos)
            self._write(pos, memoryview(zeros)[:n])
            pos += n

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        yield Extent(offset, length, ExtentKind.DATA)

    # ---- helpers ----
    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(
                f"{self.path or self.format_name}: range [{offset}, {offset + length}) is outside the "
                f"virtual disk of {self.size} bytes")

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.path or self.format_name}: disk is open read-only")


def pread_exact(fd: int, buf: memoryview, offset: int) -> int:
    """Read len(buf) bytes at offset; returns how many were read (fewer only at end of file)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def pwrite_all(fd: int, data, offset: int) -> None:
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


def small_folios(fd: int, drop: bool = False) -> None:
    """Keep the page cache of a guest's disk in small pages: no readahead through `fd` (and, with `drop`,
    the image's clean cached pages dropped now). Why: Linux (ext4 since 6.16) caches a file in folios as
    large as the reads or writes that brought them in, up to 2 MiB with readahead, and every later write
    walks all of its folio's blocks. Measured on this project's machine: a 4 KiB pwrite costs 1.8 us into
    4 KiB pages and 12-20 us into pages read or written in 1 MiB steps, the guest's random writes paying
    that on the export's loop. A copy or resync reading the disk in large steps would otherwise leave the
    whole disk in large folios. Advice only: where the kernel refuses it, nothing changes."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        if drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):       # pragma: no cover - a file system or platform without it
        pass

"""Raw disk images: the virtual disk is the file (or block device) byte for byte.

Also home of the small file helpers other drivers reuse for their data regions: hole punching
(so zeroed ranges stop occupying space) and SEEK_DATA/SEEK_HOLE extent mapping (so copy loops skip
holes without reading them).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from typing import Iterator

from ..errors import DiskIOError, UsageError
from .base import BlockDevice, Extent, ExtentKind, FileSync, pread_exact, pwrite_all
from .locks import lock_image

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
# errnos meaning "this file system / file cannot do that", as opposed to a real I/O failure
_NOT_SUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV, errno.ENOTTY}


@contextlib.contextmanager
def io_errors(path: str, action: str):
    """Turn an OSError into DiskIOError naming the file and what was being done."""
    try:
        yield
    except OSError as e:
        raise DiskIOError(f"{path}: {action}: {e.strerror or e}") from e


def _load_fallocate():
    """libc's fallocate64 (or fallocate) with 64-bit offsets, or None where libc has neither."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate [offset, offset+length) keeping the file size; False if the file system can't.

    Reads of a punched range return zeros, so this is the cheap way to zero a range of a sparse file.
    """
    if _fallocate is None or length <= 0:
        return False
    rc = _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in _NOT_SUPPORTED:
        return False
    raise OSError(err, os.strerror(err))


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Write explicit zeros, 1 MiB at a time (the fallback when holes can't be punched)."""
    chunk = bytes(min(length, 1 << 20))
    pos, end = offset, offset + length
    while pos < end:
        n = min(len(chunk), end - pos)
        pwrite_all(fd, memoryview(chunk)[:n], pos)
        pos += n


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make a file range read as zeros, freeing its space where the file system allows."""
    if not punch_hole(fd, offset, length):
        write_zeros(fd, offset, length)


def file_extents(fd: int, offset: int, length: int) -> Iterator[Extent]:
    """Map [offset, offset+length) of a file to DATA/ZERO extents with SEEK_DATA/SEEK_HOLE.

    Where seeking for data is unsupported the whole range is reported as DATA (always safe).
    """
    end = offset + length
    pos = offset
    while pos < end:
        data = _seek(fd, pos, os.SEEK_DATA, end)
        if data is None:
            yield Extent(pos, end - pos, ExtentKind.DATA)
            return
        data = min(data, end)
        if data > pos:
            yield Extent(pos, data - pos, ExtentKind.ZERO)
        if data >= end:
            return
        hole = _seek(fd, data, os.SEEK_HOLE, end)
        hole = end if hole is None else min(max(hole, data + 1), end)
        yield Extent(data, hole - data, ExtentKind.DATA)
        pos = hole


def _seek(fd: int, pos: int, whence: int, end: int) -> int | None:
    """lseek for SEEK_DATA/SEEK_HOLE: `end` when there is no more data, None when unsupported."""
    try:
        return os.lseek(fd, pos, whence)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return end
        if e.errno in _NOT_SUPPORTED:
            return None
        raise


class RawDisk(BlockDevice):
    """A raw image file or block device; the virtual size is the file size at open time."""

    format_name = "raw"

    def __init__(self, fd: int, path: str, size: int, read_only: bool):
        self.fd = fd
        self.path = path
        self.size = size
        self.read_only = read_only

    def _readinto(self, offset: int, buf: memoryview) -> None:
        with io_errors(self.path, f"read at offset {offset}"):
            got = pread_exact(self.fd, buf, offset)
        if got < len(buf):  # the file shrank under us: what is gone reads as zeros, like a hole
            buf[got:] = bytes(len(buf) - got)

    def _write(self, offset: int, data: memoryview) -> None:
        with io_errors(self.path, f"write at offset {offset}"):
            pwrite_all(self.fd, data, offset)

    def _write_zeroes(self, offset: int, length: int) -> None:
        with io_errors(self.path, f"zeroing {length} bytes at offset {offset}"):
            zero_range(self.fd, offset, length)

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        with io_errors(self.path, "mapping allocated ranges"):
            yield from file_extents(self.fd, offset, length)

    def flush(self) -> None:
        if not self.read_only and self.fd >= 0:
            with io_errors(self.path, "fsync"):
                os.fsync(self.fd)

    def flush_begin(self):
        if self.read_only or self.fd < 0:
            return None
        return FileSync(self.fd, self.flush)        # no metadata of its own: the fsync is all

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with io_errors(self.path, "close"):
                os.close(fd)


def open_file(path: str, read_only: bool) -> int:
    """Open an existing image for reading (or reading and writing), errors as DiskIOError.

    A read-write open takes QEMU's image locks (ImageLocked when another process writes the image or
    lets nobody write it); a read-only open takes none."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | getattr(os, "O_CLOEXEC", 0)
    with io_errors(str(path), "open"):
        fd = os.open(path, flags)
    if not read_only:
        _lock_or_close(fd, str(path))
    return fd


def _lock_or_close(fd: int, path: str) -> None:
    try:
        lock_image(fd, path, write=True)
    except BaseException:
        os.close(fd)
        raise


def create_file(path: str, overwrite: bool) -> int:
    """Create an image file read-write; refuses to clobber an existing file unless told to, and an
    existing file is emptied only once its image locks are ours."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    if not overwrite:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        raise UsageError(f"{path}: already exists (refusing to overwrite it)") from None
    except OSError as e:
        raise DiskIOError(f"{path}: create: {e.strerror or e}") from e
    _lock_or_close(fd, str(path))
    if overwrite:
        try:
            with io_errors(str(path), "emptying the old contents"):
                os.ftruncate(fd, 0)
        except BaseException:
            os.close(fd)
            raise
    return fd


def discard_file(fd: int, path) -> None:
    """Close and remove a half-created image so a failed create leaves nothing behind."""
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(path)


def open_raw(path, read_only: bool = True) -> RawDisk:
    fd = open_file(path, read_only)
    try:
        with io_errors(str(path), "finding the size"):
            size = os.lseek(fd, 0, os.SEEK_END)
    except BaseException:
        os.close(fd)
        raise
    return RawDisk(fd, str(path), size, read_only)


def create_raw(path, size: int, overwrite: bool = False) -> RawDisk:
    """Create a sparse raw image of `size` bytes (all holes, reading as zeros), open read-write."""
    if size < 0:
        raise UsageError(f"{path}: disk size must not be negative (got {size})")
    fd = create_file(path, overwrite)
    try:
        with io_errors(str(path), f"setting the size to {size} bytes"):
            os.ftruncate(fd, size)
    except BaseException:
        discard_file(fd, path)
        raise
    return RawDisk(fd, str(path), size, read_only=False)

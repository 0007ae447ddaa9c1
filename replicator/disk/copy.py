"""Copy one virtual disk into another, reading only the extents that hold data.

Reading and writing overlap: a reader thread fills a small ring of buffers while the caller's thread
writes them (both release the GIL in their system calls), so a copy uses both cores with memory bounded
by the ring. Inside data extents, all-zero 4 KiB runs are not written when the target already reads as
zeros (as qemu-img convert does with -S 4k), so the copy stays sparse.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..pipeline import ahead_in
from .base import BlockDevice, ExtentKind, pwrite_all

CHUNK = 4 << 20
RING = 4
SPARSE_GRAIN = 4096


@dataclass
class CopyStats:
    data_bytes: int = 0        # bytes read from data extents
    written_bytes: int = 0     # bytes written to the target
    zero_bytes: int = 0        # bytes of zero extents, never read


def copy_range_sparse(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    """[offset, offset + length) of one file to the same place in another, its all-zero grains left
    unwritten (holes in a new file); returns the bytes read (fewer at the end of src)."""
    piece = os.pread(src_fd, length, offset)
    view = memoryview(piece)
    for a, b in nonzero_runs(piece):
        pwrite_all(dst_fd, view[a:b], offset + a)
    return len(piece)


def nonzero_runs(buf, grain: int = SPARSE_GRAIN):
    """(start, end) byte ranges of buf that are not all-zero at `grain` granularity."""
    zero = kernels.zero_blocks(buf, grain, threads=1)   # 4 MiB: starting threads costs more than it saves
    if not zero.any():
        yield 0, len(buf)
        return
    edges = np.flatnonzero(np.diff(np.concatenate(([True], zero, [True])).astype(np.int8)))
    for a, b in zip(edges[::2], edges[1::2]):
        yield int(a) * grain, min(int(b) * grain, len(buf))


def _chunks(src: BlockDevice):
    """(offset, length, kind) pieces of at most CHUNK bytes over the whole disk."""
    for ext in src.extents():
        if ext.kind is ExtentKind.ZERO:
            yield ext.offset, ext.length, ext.kind
            continue
        for pos in range(ext.offset, ext.end, CHUNK):
            yield pos, min(CHUNK, ext.end - pos), ext.kind


def read_ahead(src: BlockDevice, ring: int = RING):
    """Yield (offset, view or None for a zero extent, length); the view is valid until the next item."""
    def read(piece, buf):
        off, n, kind = piece
        if kind is ExtentKind.ZERO:
            return off, None, n
        view = memoryview(buf)[:n]
        src.readinto(off, view)
        return off, view, n
    return ahead_in(read, _chunks(src), [bytearray(CHUNK) for _ in range(ring)], name="read-ahead")


def copy_disk(src: BlockDevice, dst: BlockDevice, *, dst_is_zero: bool = True, progress=None,
              flush: bool = True) -> CopyStats:
    """Make dst read like src over src's size; flush=False leaves durability to the caller."""
    stats = CopyStats()
    for off, view, n in read_ahead(src):
        if view is None:
            if not dst_is_zero:
                dst.write_zeroes(off, n)
            stats.zero_bytes += n
            continue
        stats.data_bytes += n
        if dst_is_zero:
            for a, b in nonzero_runs(view):
                dst.write(off + a, view[a:b])
                stats.written_bytes += b - a
        else:
            dst.write(off, view)
            stats.written_bytes += n
        if progress:
            progress(stats)
    if flush:
        dst.flush()
    return stats

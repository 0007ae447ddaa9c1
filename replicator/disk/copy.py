"""Copy one virtual disk into another, reading only the extents that hold data."""
from __future__ import annotations

from dataclasses import dataclass

from .base import BlockDevice, ExtentKind

CHUNK = 4 << 20


@dataclass
class CopyStats:
    data_bytes: int = 0
    zero_bytes: int = 0


def copy_disk(src: BlockDevice, dst: BlockDevice, *, dst_is_zero: bool = True, progress=None) -> CopyStats:
    """Make dst read like src over src's size. Zero extents are skipped when dst already reads as zeros."""
    stats = CopyStats()
    buf = bytearray(CHUNK)
    for ext in src.extents():
        if ext.kind is ExtentKind.ZERO:
            if not dst_is_zero:
                dst.write_zeroes(ext.offset, ext.length)
            stats.zero_bytes += ext.length
            continue
        pos = ext.offset
        while pos < ext.end:
            n = min(CHUNK, ext.end - pos)
            view = memoryview(buf)[:n]
            src.readinto(pos, view)
            dst.write(pos, view)
            pos += n
            stats.data_bytes += n
            if progress:
                progress(stats)
    dst.flush()
    return stats

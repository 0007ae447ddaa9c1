"""Building streams from what the replication paths have: an HRL log, a whole disk, or a list of ranges.

Each reads at most one block at a time into a reused buffer, so encoding a log or a disk of any size
holds a couple of frames in memory. Zero runs in the data become ZERO frames (the encoder finds them).
"""
from __future__ import annotations

from typing import Iterable

from ..disk.base import ExtentKind
from ..errors import UsageError
from .encoder import DeltaEncoder, EncodeStats
from .format import StreamHeader


def encode_log(reader, header: StreamHeader, sink, *, compress: bool = True, level: int = 1) -> EncodeStats:
    """One stream from an HRL log's coalesced extents (last write wins). The log's DataChecksums are not
    rechecked here: call `reader.verify_data()` first when the log comes from untrusted storage."""
    enc = DeltaEncoder(header, sink, compress=compress, level=level)
    step = header.block_size
    for ext in reader.extents():
        for pos in range(0, ext.length, step):
            n = min(step, ext.length - pos)
            enc.add_data(ext.offset + pos, reader.read_raw(ext.data_location + pos, n))
    enc.finish()
    return enc.stats


def encode_disk(disk, header: StreamHeader, sink, *, zero_extents: bool = False, compress: bool = True,
                level: int = 1) -> EncodeStats:
    """Every DATA extent of a disk (initial replication, seeds). ZERO extents are skipped because the
    target starts out zeroed; with zero_extents=True they travel as ZERO frames for a target that is not."""
    _check_size(disk, header)
    enc = DeltaEncoder(header, sink, compress=compress, level=level)
    buf = bytearray(header.block_size)
    for ext in disk.extents():
        if ext.kind == ExtentKind.DATA:
            _copy_range(disk, enc, ext.offset, ext.length, buf)
        elif zero_extents:
            enc.add_zero(ext.offset, ext.length)
    enc.finish()
    return enc.stats


def encode_extents(disk, extents: Iterable, header: StreamHeader, sink, *, compress: bool = True,
                   level: int = 1) -> EncodeStats:
    """The given ranges of a disk, in the order given ((offset, length) pairs or objects with .offset and
    .length), as resync and scan find them. Zeros found in them travel as ZERO frames."""
    _check_size(disk, header)
    enc = DeltaEncoder(header, sink, compress=compress, level=level)
    buf = bytearray(header.block_size)
    for ext in extents:
        offset, length = (ext.offset, ext.length) if hasattr(ext, "offset") else ext
        _copy_range(disk, enc, offset, length, buf)
    enc.finish()
    return enc.stats


def _check_size(disk, header: StreamHeader) -> None:
    if disk.size != header.disk_size:
        raise UsageError(f"{disk.path or disk.format_name}: disk of {disk.size} bytes, but the stream header "
                         f"says {header.disk_size}")


def _copy_range(disk, enc: DeltaEncoder, offset: int, length: int, buf: bytearray) -> None:
    view = memoryview(buf)
    end = offset + length
    while offset < end:
        n = min(len(buf), end - offset)
        disk.readinto(offset, view[:n])
        enc.add_data(offset, view[:n])
        offset += n

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


def encode_log(reader, header: StreamHeader, sink, *, compress: bool = True, level: int = 1,
               progress=None, pace=None) -> EncodeStats:
    """One stream from an HRL log's coalesced extents (last write wins). The log's DataChecksums are not
    rechecked here: call `reader.verify_data()` first when the log comes from untrusted storage.
    `progress(done, total)` is called with changed bytes encoded so far; pace(n) as in encode_extents."""
    step = header.block_size
    extents = list(reader.extents())
    meter = _Meter(progress, sum(ext.length for ext in extents))
    with DeltaEncoder(header, sink, compress=compress, level=level) as enc:
        for ext in extents:
            for pos in range(0, ext.length, step):
                n = min(step, ext.length - pos)
                enc.add_data(ext.offset + pos, reader.read_raw(ext.data_location + pos, n))
                meter.add(n)
                if pace is not None:
                    pace(n)
        enc.finish()
    meter.done()
    return enc.stats


def encode_disk(disk, header: StreamHeader, sink, *, zero_extents: bool = False, compress: bool = True,
                level: int = 1, progress=None) -> EncodeStats:
    """Every DATA extent of a disk (initial replication, seeds). ZERO extents are skipped because the
    target starts out zeroed; with zero_extents=True they travel as ZERO frames for a target that is not."""
    _check_size(disk, header)
    buf = bytearray(header.block_size)
    extents = list(disk.extents())
    meter = _Meter(progress, sum(e.length for e in extents if e.kind == ExtentKind.DATA))
    with DeltaEncoder(header, sink, compress=compress, level=level) as enc:
        for ext in extents:
            if ext.kind == ExtentKind.DATA:
                _copy_range(disk, enc, ext.offset, ext.length, buf, meter)
            elif zero_extents:
                enc.add_zero(ext.offset, ext.length)
        enc.finish()
    meter.done()
    return enc.stats


def encode_extents(disk, extents: Iterable, header: StreamHeader, sink, *, compress: bool = True,
                   level: int = 1, progress=None, pace=None) -> EncodeStats:
    """The given ranges of a disk, in the order given ((offset, length) pairs or objects with .offset and
    .length), as resync and scan find them. Zeros found in them travel as ZERO frames. pace(n), if given,
    is called after each chunk of n bytes is read (and may sleep: replication.pacing)."""
    _check_size(disk, header)
    buf = bytearray(header.block_size)
    ranges = [(ext.offset, ext.length) if hasattr(ext, "offset") else tuple(ext) for ext in extents]
    meter = _Meter(progress, sum(n for _, n in ranges))
    with DeltaEncoder(header, sink, compress=compress, level=level) as enc:
        for offset, length in ranges:
            _copy_range(disk, enc, offset, length, buf, meter, pace)
        enc.finish()
    meter.done()
    return enc.stats


def _check_size(disk, header: StreamHeader) -> None:
    if disk.size != header.disk_size:
        raise UsageError(f"{disk.path or disk.format_name}: disk of {disk.size} bytes, but the stream header "
                         f"says {header.disk_size}")


def _copy_range(disk, enc: DeltaEncoder, offset: int, length: int, buf: bytearray, meter: "_Meter",
                pace=None) -> None:
    view = memoryview(buf)
    end = offset + length
    while offset < end:
        n = min(len(buf), end - offset)
        disk.readinto(offset, view[:n])
        enc.add_data(offset, view[:n])
        meter.add(n)
        if pace is not None:
            pace(n)
        offset += n


class _Meter:
    """Reports progress(done, total) as data is encoded; the last report has done == total."""

    def __init__(self, progress, total: int):
        self.progress, self.total, self.done_bytes = progress, total, 0
        if progress is not None:
            progress(0, total)

    def add(self, n: int) -> None:
        self.done_bytes += n
        if self.progress is not None and self.done_bytes < self.total:
            self.progress(self.done_bytes, self.total)

    def done(self) -> None:
        if self.progress is not None:
            self.progress(self.total, self.total)

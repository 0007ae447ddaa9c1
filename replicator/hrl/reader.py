"""Reading a Hyper-V Replica Log: the two-pass traversal of §2.5, the writes in order, and the coalesced
extent map (last write wins) that shipping and apply use.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError
from .format import HEADER_SIZE, LogHeader, MetadataBlock, checksum, parse_header, parse_metadata


class LogNotSealed(FormatError):
    """EOLLocation is 0: the log was not closed cleanly, so its end cannot be trusted."""


@dataclass(frozen=True)
class LogWrite:
    offset: int            # on the virtual disk
    length: int
    data_location: int     # in the log file
    data_checksum: int
    timestamp: int


@dataclass(frozen=True)
class Extent:
    """A coalesced piece: disk [offset, offset+length) comes from the log at data_location."""
    offset: int
    length: int
    data_location: int


class HrlReader:
    def __init__(self, path: str, disk_size: int | None = None):
        self.path = path
        self.disk_size = disk_size
        # a FIFO or device at a log's name would block the open or the reads: only a regular file is a log
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | os.O_NONBLOCK)
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise FormatError("HRL file", None, "not a regular file", path)
            self.file_size = st.st_size
            self.header: LogHeader = parse_header(os.pread(self.fd, HEADER_SIZE, 0), path)
            if not self.header.closed_cleanly:
                raise LogNotSealed("HRL header", 44, "EOLLocation is 0: the log was not closed cleanly", path)
            if self.header.eol_location > self.file_size:
                raise FormatError("HRL header", 44, f"EOLLocation {self.header.eol_location} is past the end of "
                                  f"the file ({self.file_size} bytes): the log is truncated", path)
            self.blocks = self._metadata_chain()
            self.writes = self._writes()
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- pass 1: walk back from EOL through PreviousMetadataLocation
    def _metadata_chain(self) -> list[MetadataBlock]:
        size = self.header.metadata_size
        location = self.header.eol_location - size
        stack = []
        while True:
            if location < HEADER_SIZE or location + size > self.header.eol_location:
                raise FormatError("HRL metadata block", location, "location lies outside the log", self.path)
            block = parse_metadata(os.pread(self.fd, size, location), location, size, self.path)
            stack.append(block)
            if block.previous_location == 0:
                break
            previous = location - block.previous_location
            if block.previous_location < size or previous < HEADER_SIZE:
                raise FormatError("HRL metadata header", location,
                                  f"PreviousMetadataLocation {block.previous_location} points outside the log",
                                  self.path)
            location = previous
        return stack[::-1]

    # ---- pass 2: the data entries of each block lie just before it
    def _writes(self) -> list[LogWrite]:
        out = []
        cursor = HEADER_SIZE
        size = self.header.metadata_size
        for block in self.blocks:
            for i, e in enumerate(block.entries):
                if cursor + e.data_length > block.location:
                    raise FormatError(f"HRL metadata entry {i + 1}", block.location,
                                      f"data of {e.data_length} bytes at {cursor} runs into its metadata block",
                                      self.path)
                if self.disk_size is not None and e.byte_offset + e.data_length > self.disk_size:
                    raise FormatError(f"HRL metadata entry {i + 1}", block.location,
                                      f"write [{e.byte_offset}, {e.byte_offset + e.data_length}) is beyond the "
                                      f"disk size {self.disk_size}", self.path)
                out.append(LogWrite(e.byte_offset, e.data_length, cursor, e.data_checksum, e.timestamp))
                cursor += e.data_length
            cursor = block.location + size
        return out

    # ---- data
    def read_data(self, w: LogWrite, verify: bool = True) -> bytes:
        data = os.pread(self.fd, w.length, w.data_location)
        if len(data) < w.length:
            raise FormatError("HRL data entry", w.data_location, "truncated", self.path)
        if verify and w.data_checksum and checksum(data) != w.data_checksum:
            raise FormatError("HRL data entry", w.data_location,
                              f"DataChecksum mismatch for the write at disk offset {w.offset}", self.path)
        return data

    def read_raw(self, location: int, length: int) -> bytes:
        data = os.pread(self.fd, length, location)
        if len(data) < length:
            raise FormatError("HRL data entry", location, "truncated", self.path)
        return data

    def verify_data(self, run: int = 8 << 20) -> int:
        """Check every recorded DataChecksum (0 means none was recorded); returns bytes of data read.
        Consecutive entries are read together, up to `run` bytes per read."""
        total, i, writes = 0, 0, self.writes
        while i < len(writes):
            start = writes[i].data_location
            end, j = start + writes[i].length, i + 1
            while j < len(writes) and writes[j].data_location == end and end + writes[j].length - start <= run:
                end += writes[j].length
                j += 1
            buf = self.read_raw(start, end - start)
            for w in writes[i:j]:
                piece = memoryview(buf)[w.data_location - start:w.data_location - start + w.length]
                if w.data_checksum and checksum(piece) != w.data_checksum:
                    raise FormatError("HRL data entry", w.data_location,
                                      f"DataChecksum mismatch for the write at disk offset {w.offset}", self.path)
                total += w.length
            i = j
        return total

    def extents(self) -> list[Extent]:
        return coalesce(self.writes)


def coalesce(writes: list[LogWrite]) -> list[Extent]:
    """Last write wins: each byte of the result comes from the latest write that covered it."""
    if not writes:
        return []
    starts = np.fromiter((w.offset for w in writes), dtype=np.int64, count=len(writes))
    lengths = np.fromiter((w.length for w in writes), dtype=np.int64, count=len(writes))
    locs = np.fromiter((w.data_location for w in writes), dtype=np.int64, count=len(writes))
    keep = lengths > 0
    idx = np.flatnonzero(keep)
    if not len(idx):
        return []
    starts, ends, locs = starts[idx], starts[idx] + lengths[idx], locs[idx]
    bounds = np.unique(np.concatenate((starts, ends)))
    lo, hi = np.searchsorted(bounds, starts), np.searchsorted(bounds, ends)
    counts = hi - lo
    # every elementary interval each write covers, painted with the write's order: the latest wins
    cover = np.repeat(lo - np.concatenate(([0], np.cumsum(counts)[:-1])), counts) + np.arange(counts.sum())
    owner = np.full(len(bounds) - 1, -1, dtype=np.int64)
    np.maximum.at(owner, cover, np.repeat(np.arange(len(starts)), counts))
    seg = np.flatnonzero(owner >= 0)
    seg_start, seg_end, seg_owner = bounds[seg], bounds[seg + 1], owner[seg]
    seg_loc = locs[seg_owner] + (seg_start - starts[seg_owner])
    # merge neighbours that continue each other on disk and in the log
    joined = (seg_start[1:] == seg_end[:-1]) & (seg_loc[1:] == seg_loc[:-1] + (seg_end[:-1] - seg_start[:-1]))
    first = np.concatenate(([True], ~joined))
    run_id = np.cumsum(first) - 1
    run_end = np.zeros(run_id[-1] + 1, dtype=np.int64)
    np.maximum.at(run_end, run_id, seg_end)
    heads = np.flatnonzero(first)
    return [Extent(int(s), int(e - s), int(l))
            for s, e, l in zip(seg_start[heads], run_end, seg_loc[heads])]

"""Hyper-V Replica Log structures (MS-HRL §2.2–2.4, §2.6): packed layouts, parse and pack.

A log is a 4096-byte header, then alternating runs of data and metadata blocks: each metadata block
(MetadataSize bytes, 4096 by default) describes the data entries written just before it and points back
to the previous metadata block, so the log can only be read backwards from EOLLocation (§2.5).
"""
from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, replace

from ..errors import FormatError
from ..kernels import byte_sum

COOKIE = b"msctlog"
VERSION_1 = 0x00010000
VERSION_2 = 0x00020000
HEADER_SIZE = 4096
DEFAULT_METADATA_SIZE = 4096
META_WRITE = 1
EPOCH_2000 = 946684800   # 2000-01-01T00:00:00Z as a Unix timestamp

# §2.2 _CTLOG_HEADER_PACKED (packed: no padding)
_HEADER = struct.Struct("<8sII4sIQQIQiI16s16sIQI2s16s")
# §2.3 _CTLOG_METADATA_HEADER_PACKED
_MD_HEADER = struct.Struct("<QII16s")
# §2.4 _CTLOG_METADATA_ENTRY_PACKED
_MD_ENTRY = struct.Struct("<QIIIBIB6s")
HEADER_CHECKSUM_AT = 40
MD_HEADER_CHECKSUM_AT = 12
ENTRY_CHECKSUM_AT = 8
assert _HEADER.size == 126 and _MD_HEADER.size == 32 and _MD_ENTRY.size == 32
ENTRY_SIZE = _MD_ENTRY.size


def checksum(buf, ignore_at: int | None = None) -> int:
    """§2.6: one's complement of the byte sum, skipping the 4-byte checksum field at ignore_at."""
    if len(buf) <= 512:                       # entries and headers: numpy's call overhead would dominate
        raw = bytes(buf)
        total = sum(raw) - (sum(raw[ignore_at:ignore_at + 4]) if ignore_at is not None else 0)
        return ~total & 0xFFFFFFFF
    total = byte_sum(buf)
    if ignore_at is not None:
        total -= sum(bytes(memoryview(buf)[ignore_at:ignore_at + 4]))
    return ~total & 0xFFFFFFFF


def hrl_time(unix_seconds: float) -> int:
    return max(0, int(unix_seconds) - EPOCH_2000) & 0xFFFFFFFF


@dataclass(frozen=True)
class LogHeader:
    version: int = VERSION_2
    timestamp: int = 0
    creator_application: bytes = b"rplc"
    creator_version: int = 0x00010000
    original_size: int = 0
    current_size: int = 0
    eol_location: int = 0
    error_code: int = 0
    metadata_size: int = DEFAULT_METADATA_SIZE
    unique_id: uuid.UUID = uuid.UUID(int=0)
    previous_unique_id: uuid.UUID = uuid.UUID(int=0)
    last_modified_timestamp: int = 0
    total_metadata_entries: int = 0
    file_type: int = 0
    vhd2_data_write_guid: uuid.UUID = uuid.UUID(int=0)

    @property
    def closed_cleanly(self) -> bool:
        return self.eol_location != 0

    def evolve(self, **changes) -> "LogHeader":
        return replace(self, **changes)

    def pack(self) -> bytes:
        buf = bytearray(HEADER_SIZE)
        _HEADER.pack_into(buf, 0, COOKIE + b"\0", self.version, self.timestamp, self.creator_application[:4],
                          self.creator_version, self.original_size, self.current_size, 0, self.eol_location,
                          self.error_code, self.metadata_size, self.unique_id.bytes_le,
                          self.previous_unique_id.bytes_le, self.last_modified_timestamp,
                          self.total_metadata_entries, self.file_type, b"\0\0",
                          self.vhd2_data_write_guid.bytes_le)
        struct.pack_into("<I", buf, HEADER_CHECKSUM_AT, checksum(buf, HEADER_CHECKSUM_AT))
        return bytes(buf)


def parse_header(buf: bytes, path: str | None = None) -> LogHeader:
    if len(buf) < HEADER_SIZE:
        raise FormatError("HRL header", 0, f"file is {len(buf)} bytes, shorter than the 4096-byte header", path)
    (cookie, version, ts, creator, creator_version, original, current, stored, eol, err, md_size, uid, prev,
     modified, total, ftype, flags, guid) = _HEADER.unpack_from(buf, 0)
    if cookie.rstrip(b"\0 ") != COOKIE:
        raise FormatError("HRL header", 0, f"cookie is {cookie!r}, not 'msctlog'", path)
    if checksum(buf[:HEADER_SIZE], HEADER_CHECKSUM_AT) != stored:
        raise FormatError("HRL header", HEADER_CHECKSUM_AT, "checksum mismatch", path)
    if version not in (VERSION_1, VERSION_2):
        raise FormatError("HRL header", 8, f"LogFormatVersion 0x{version:08x} is not 1.0 or 2.0", path)
    if md_size < _MD_HEADER.size + _MD_ENTRY.size or md_size % 32 or md_size > 1 << 20:
        raise FormatError("HRL header", 56, f"MetadataSize {md_size} is not a usable metadata block size", path)
    if ftype != 0:
        raise FormatError("HRL header", 104, f"FileType {ftype} is not an HRL (0)", path)
    if eol and (eol < HEADER_SIZE + md_size or eol > current):
        raise FormatError("HRL header", 44, f"EOLLocation {eol} lies outside the log of {current} bytes", path)
    return LogHeader(version, ts, creator, creator_version, original, current, eol, err, md_size,
                     uuid.UUID(bytes_le=uid), uuid.UUID(bytes_le=prev), modified, total, ftype,
                     uuid.UUID(bytes_le=guid) if version == VERSION_2 else uuid.UUID(int=0))


@dataclass(frozen=True)
class MetadataEntry:
    byte_offset: int          # on the virtual disk
    data_length: int
    timestamp: int = 0
    meta_operation: int = META_WRITE
    data_checksum: int = 0

    def pack(self) -> bytes:
        buf = bytearray(ENTRY_SIZE)
        pack_entry_into(buf, 0, self.byte_offset, self.data_length, self.timestamp, self.data_checksum,
                        self.meta_operation)
        return bytes(buf)


def pack_entry_into(buf, at: int, byte_offset: int, data_length: int, timestamp: int, data_checksum: int,
                    meta_operation: int = META_WRITE) -> None:
    """§2.4: one metadata entry, its checksum included, at buf[at:at + ENTRY_SIZE] (the export's native write
    path packs the same bytes: native/nbdserve.c)."""
    _MD_ENTRY.pack_into(buf, at, byte_offset, 0, data_length, timestamp, meta_operation, data_checksum, 0, b"")
    struct.pack_into("<I", buf, at + ENTRY_CHECKSUM_AT,
                     checksum(memoryview(buf)[at:at + ENTRY_SIZE], ENTRY_CHECKSUM_AT))


@dataclass(frozen=True)
class MetadataBlock:
    location: int                     # absolute offset in the log file
    previous_location: int            # relative, as stored (0 for the first)
    entries: tuple[MetadataEntry, ...]


def entries_per_block(metadata_size: int) -> int:
    return (metadata_size - _MD_HEADER.size) // _MD_ENTRY.size


def pack_metadata(previous_relative: int, packed_entries, count: int, metadata_size: int) -> bytes:
    """A metadata block: its header, then `count` entries already packed (pack_entry_into), in order."""
    buf = bytearray(metadata_size)
    _MD_HEADER.pack_into(buf, 0, previous_relative, count, 0, b"")
    struct.pack_into("<I", buf, MD_HEADER_CHECKSUM_AT, checksum(buf[:_MD_HEADER.size], MD_HEADER_CHECKSUM_AT))
    buf[_MD_HEADER.size:_MD_HEADER.size + count * ENTRY_SIZE] = memoryview(packed_entries)[:count * ENTRY_SIZE]
    return bytes(buf)


def parse_metadata(buf: bytes, location: int, metadata_size: int, path: str | None = None) -> MetadataBlock:
    if len(buf) < metadata_size:
        raise FormatError("HRL metadata block", location, "truncated", path)
    prev, count, stored, _ = _MD_HEADER.unpack_from(buf, 0)
    if checksum(buf[:_MD_HEADER.size], MD_HEADER_CHECKSUM_AT) != stored:
        raise FormatError("HRL metadata header", location, "checksum mismatch", path)
    if count > entries_per_block(metadata_size):
        raise FormatError("HRL metadata header", location + 8,
                          f"ValidMetadataEntries {count} exceeds the {entries_per_block(metadata_size)} that fit",
                          path)
    entries = []
    for i in range(count):
        at = _MD_HEADER.size + i * _MD_ENTRY.size
        raw = buf[at:at + _MD_ENTRY.size]
        off, stored_e, length, ts, op, data_ck, _, _ = _MD_ENTRY.unpack(raw)
        if checksum(raw, ENTRY_CHECKSUM_AT) != stored_e:
            raise FormatError(f"HRL metadata entry {i + 1}", location + at, "checksum mismatch", path)
        if op != META_WRITE:
            raise FormatError(f"HRL metadata entry {i + 1}", location + at + 20,
                              f"MetaOperation {op} is not a write (1)", path)
        entries.append(MetadataEntry(off, length, ts, op, data_ck))
    return MetadataBlock(location, prev, tuple(entries))

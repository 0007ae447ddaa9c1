"""The VHDX metadata log (MS-VHDX §2.3): entry encoding, the ring writer, and replay on open.

Every metadata update (BAT pages, sector bitmap pages, zeroed structures) is first written to the log
and flushed, then applied in place and flushed again, so a crash at any instant reopens to the old or the
new state. Our writer applies each entry before writing the next and points every entry's Tail at itself,
so the active sequence is always one entry and replaying an already-applied entry is harmless.
"""
from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from ..errors import FormatError
from ..kernels import crc32c
from .structures import MiB, guid_le

SECTOR = 4096
ENTRY_SIGNATURE = b"loge"
ZERO_SIGNATURE = b"zero"
DESC_SIGNATURE = b"desc"
DATA_SIGNATURE = b"data"
_ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")  # 64 bytes
_ZERO_DESC = struct.Struct("<4sIQQQ")           # 32 bytes
_DATA_DESC = struct.Struct("<4s4s8sQQ")         # 32 bytes
FIRST_SECTOR_DESCRIPTORS = (SECTOR - 64) // 32   # 126
PROTECTED_PREFIX = 192 * 1024                    # file identifier and both headers: never via the log
MAX_FILE_SIZE = 1 << 47                          # 128 TiB: a 64 TiB disk plus any metadata fits
OTHER_SECTOR_DESCRIPTORS = SECTOR // 32          # 128


@dataclass(frozen=True)
class DataUpdate:
    """Write this 4 KiB sector at file_offset."""
    file_offset: int
    data: bytes


@dataclass(frozen=True)
class ZeroUpdate:
    """Zero length bytes at file_offset (both multiples of 4 KiB)."""
    file_offset: int
    length: int


@dataclass(frozen=True)
class LogEntry:
    position: int          # byte offset inside the log
    length: int
    tail: int
    sequence_number: int
    flushed_file_offset: int
    last_file_offset: int
    updates: tuple          # DataUpdate | ZeroUpdate, in descriptor order


def descriptor_sectors(count: int) -> int:
    if count <= FIRST_SECTOR_DESCRIPTORS:
        return 1
    return 1 + -(-(count - FIRST_SECTOR_DESCRIPTORS) // OTHER_SECTOR_DESCRIPTORS)


def entry_size(n_data: int, n_zero: int) -> int:
    return (descriptor_sectors(n_data + n_zero) + n_data) * SECTOR


def _descriptor_offset(index: int) -> int:
    """Byte offset of descriptor `index` within the entry."""
    if index < FIRST_SECTOR_DESCRIPTORS:
        return 64 + 32 * index
    rest = index - FIRST_SECTOR_DESCRIPTORS
    return SECTOR * (1 + rest // OTHER_SECTOR_DESCRIPTORS) + 32 * (rest % OTHER_SECTOR_DESCRIPTORS)


def encode_entry(updates, *, sequence_number: int, log_guid: uuid.UUID, tail: int,
                 flushed_file_offset: int, last_file_offset: int) -> bytes:
    """Serialize one log entry (§2.3.1); data sectors keep their first 8 and last 4 bytes in descriptors."""
    data = [u for u in updates if isinstance(u, DataUpdate)]
    n_desc = len(updates)
    head = descriptor_sectors(n_desc) * SECTOR
    buf = bytearray(head + len(data) * SECTOR)
    _ENTRY_HEADER.pack_into(buf, 0, ENTRY_SIGNATURE, 0, len(buf), tail, sequence_number, n_desc, 0,
                            log_guid.bytes_le, flushed_file_offset, last_file_offset)
    hi, lo = struct.pack("<I", sequence_number >> 32), struct.pack("<I", sequence_number & 0xFFFFFFFF)
    data_index = 0
    for i, u in enumerate(updates):
        at = _descriptor_offset(i)
        if isinstance(u, ZeroUpdate):
            _ZERO_DESC.pack_into(buf, at, ZERO_SIGNATURE, 0, u.length, u.file_offset, sequence_number)
            continue
        if len(u.data) != SECTOR:
            raise ValueError("log data updates are whole 4 KiB sectors")
        _DATA_DESC.pack_into(buf, at, DESC_SIGNATURE, u.data[4092:], u.data[:8], u.file_offset, sequence_number)
        sec = head + data_index * SECTOR
        buf[sec:sec + 4] = DATA_SIGNATURE
        buf[sec + 4:sec + 8] = hi
        buf[sec + 8:sec + 4092] = u.data[8:4092]
        buf[sec + 4092:sec + 4096] = lo
        data_index += 1
    struct.pack_into("<I", buf, 4, crc32c(buf))
    return bytes(buf)


class _Ring:
    """The log region as a circular byte buffer held in memory for the scan."""

    def __init__(self, raw: bytes):
        self.raw = raw
        self.size = len(raw)

    def read(self, pos: int, length: int) -> bytes:
        pos %= self.size
        if pos + length <= self.size:
            return self.raw[pos:pos + length]
        first = self.raw[pos:]
        return first + self.raw[:length - len(first)]


def decode_entry(ring: _Ring, pos: int, log_guid: uuid.UUID, log_offset: int) -> LogEntry | None:
    """The valid entry at pos, or None: any field, descriptor, data sector or checksum mismatch fails it."""
    head = ring.read(pos, SECTOR)
    sig, _, length, tail, seq, count, _, guid, flushed, last = _ENTRY_HEADER.unpack_from(head, 0)
    if sig != ENTRY_SIGNATURE or guid_le(guid) != log_guid or seq == 0:
        return None
    if length == 0 or length % SECTOR or length > ring.size or tail % SECTOR or tail >= ring.size:
        return None
    if flushed % MiB or last % MiB:
        return None
    n_head = descriptor_sectors(count)
    if n_head * SECTOR > length:
        return None
    entry = ring.read(pos, length)
    zeroed = bytearray(entry)
    zeroed[4:8] = b"\0\0\0\0"
    if crc32c(zeroed) != struct.unpack_from("<I", entry, 4)[0]:
        return None
    updates = []
    data_index = 0
    for i in range(count):
        at = _descriptor_offset(i)
        kind = entry[at:at + 4]
        if kind == ZERO_SIGNATURE:
            _, _, zlen, foff, dseq = _ZERO_DESC.unpack_from(entry, at)
            if dseq != seq or zlen % SECTOR or foff % SECTOR:
                return None
            updates.append(ZeroUpdate(foff, zlen))
        elif kind == DESC_SIGNATURE:
            _, trailing, leading, foff, dseq = _DATA_DESC.unpack_from(entry, at)
            sec = (n_head + data_index) * SECTOR
            if dseq != seq or foff % SECTOR or sec + SECTOR > length:
                return None
            sector = entry[sec:sec + SECTOR]
            if (sector[:4] != DATA_SIGNATURE or struct.unpack_from("<I", sector, 4)[0] != seq >> 32
                    or struct.unpack_from("<I", sector, 4092)[0] != seq & 0xFFFFFFFF):
                return None
            updates.append(DataUpdate(foff, leading + sector[8:4092] + trailing))
            data_index += 1
        else:
            return None
    if (n_head + data_index) * SECTOR != length:
        return None
    return LogEntry(pos, length, tail, seq, flushed, last, tuple(updates))


def find_active_sequence(raw_log: bytes, log_guid: uuid.UUID, log_offset: int) -> list[LogEntry]:
    """§2.3.3: scan every 4 KiB position for the newest valid, complete sequence; [] when there is none."""
    ring = _Ring(raw_log)
    best: list[LogEntry] = []
    best_seq = 0
    tail = old_tail = 0
    cache: dict[int, LogEntry | None] = {}
    while True:
        seq_entries: list[LogEntry] = []
        head = tail
        for _ in range(ring.size // SECTOR + 1):
            if head not in cache:
                cache[head] = decode_entry(ring, head, log_guid, log_offset)
            e = cache[head]
            if e is None or (seq_entries and e.sequence_number != seq_entries[-1].sequence_number + 1):
                break
            seq_entries.append(e)
            head = (head + e.length) % ring.size
        valid = bool(seq_entries) and any(x.position == seq_entries[-1].tail for x in seq_entries)
        if valid and seq_entries[-1].sequence_number > best_seq:
            best, best_seq = seq_entries, seq_entries[-1].sequence_number
        if not valid:
            tail = (tail + SECTOR) % ring.size
        else:
            tail = head % ring.size
        if tail <= old_tail:
            break
        old_tail = tail
    if not best:
        return []
    start = next(i for i, x in enumerate(best) if x.position == best[-1].tail)
    return best[start:]


def plan_replay(io, header, path: str | None = None) -> list[LogEntry]:
    """Find and validate the active sequence (§2.3.3) without writing anything."""
    raw = io.pread(header.log_length, header.log_offset)
    if len(raw) < header.log_length:
        raise FormatError("log", header.log_offset, "log region extends past the end of the file", path)
    active = find_active_sequence(raw, header.log_guid, header.log_offset)
    if not active:
        raise FormatError("log", header.log_offset,
                          f"LogGuid {header.log_guid} is set but the log holds no valid entry sequence", path)
    head = active[-1]
    if io.size() < head.flushed_file_offset:
        raise FormatError("log entry", header.log_offset + head.position,
                          f"file is {io.size()} bytes, shorter than FlushedFileOffset "
                          f"{head.flushed_file_offset}: the file was truncated", path)
    log_span = (header.log_offset, header.log_offset + header.log_length)
    if head.last_file_offset > MAX_FILE_SIZE:
        raise FormatError("log entry", header.log_offset + head.position,
                          f"LastFileOffset {head.last_file_offset} is beyond any possible VHDX file", path)
    limit = max(io.size(), head.last_file_offset)
    for entry in active:
        for u in entry.updates:
            start = u.file_offset
            end = start + (len(u.data) if isinstance(u, DataUpdate) else u.length)
            if end > limit:
                raise FormatError("log entry", header.log_offset + entry.position,
                                  f"descriptor targets [{start}, {end}), past LastFileOffset {limit}", path)
            if start < PROTECTED_PREFIX or (start < log_span[1] and log_span[0] < end):
                raise FormatError("log entry", header.log_offset + entry.position,
                                  f"descriptor targets [{start}, {end}), inside the file identifier, headers "
                                  "or the log itself, which the log must never update", path)
    return active


def replay(io, active: list[LogEntry]) -> None:
    """Apply a validated active sequence; the caller flushes and clears the header's LogGuid."""
    for entry in active:
        apply_updates(io, entry.updates)
    if io.size() < active[-1].last_file_offset:
        io.truncate(active[-1].last_file_offset)


class ReplayOverlay:
    """Reads of the file as it will be after replay, without writing: lets open validate every structure
    before the first byte is written."""

    def __init__(self, io, active: list[LogEntry]):
        self.io = io
        self.updates = [u for e in active for u in e.updates]
        self.final_size = max(io.size(), active[-1].last_file_offset)

    def size(self) -> int:
        return self.final_size

    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(self.io.pread(length, offset).ljust(min(length, max(0, self.final_size - offset)), b"\0"))
        for u in self.updates:
            data_len = len(u.data) if isinstance(u, DataUpdate) else u.length
            lo, hi = max(offset, u.file_offset), min(offset + len(buf), u.file_offset + data_len)
            if lo < hi:
                src = u.data[lo - u.file_offset:hi - u.file_offset] if isinstance(u, DataUpdate) else bytes(hi - lo)
                buf[lo - offset:hi - offset] = src
        return bytes(buf)


def apply_updates(io, updates) -> None:
    for u in updates:
        if isinstance(u, DataUpdate):
            io.pwrite(u.data, u.file_offset)
        else:
            zeros = bytes(min(u.length, MiB))
            done = 0
            while done < u.length:
                n = min(len(zeros), u.length - done)
                io.pwrite(zeros[:n], u.file_offset + done)
                done += n


class LogWriter:
    """Appends entries to the ring; each entry is applied by the caller before the next is written."""

    def __init__(self, io, log_offset: int, log_length: int, log_guid: uuid.UUID):
        self.io = io
        self.log_offset = log_offset
        self.log_length = log_length
        self.log_guid = log_guid
        self.position = 0
        self.sequence_number = 1

    def max_updates(self) -> int:
        """Data sectors per entry: an entry must fit in the ring with room to spare."""
        per_entry = self.log_length // SECTOR // 2
        return max(1, per_entry - descriptor_sectors(per_entry))

    def write(self, updates, flushed_file_offset: int, last_file_offset: int) -> None:
        blob = encode_entry(updates, sequence_number=self.sequence_number, log_guid=self.log_guid,
                            tail=self.position, flushed_file_offset=flushed_file_offset,
                            last_file_offset=last_file_offset)
        if len(blob) > self.log_length:
            raise ValueError("log entry larger than the log")
        first = min(len(blob), self.log_length - self.position)
        self.io.pwrite(blob[:first], self.log_offset + self.position)
        if first < len(blob):
            self.io.pwrite(blob[first:], self.log_offset)
        self.position = (self.position + len(blob)) % self.log_length
        self.sequence_number += 1

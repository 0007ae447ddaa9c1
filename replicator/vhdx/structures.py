"""VHDX on-disk structures (MS-VHDX §2.2–2.6): parse with validation, pack for writing.

Parsers take the raw bytes and the file offset they came from, so every FormatError names the structure
and where it broke. GUIDs are stored in Microsoft binary form (uuid bytes_le).
"""
from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field, replace

from ..errors import FormatError, UnsupportedFeature
from ..kernels import crc32c

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

# §2.2 header section layout
FILE_ID_OFFSET = 0
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_SIZE = 64 * KiB
HEADER_SECTION_SIZE = 1 * MiB

FILE_SIGNATURE = b"vhdxfile"
HEADER_SIGNATURE = b"head"
REGION_SIGNATURE = b"regi"
METADATA_SIGNATURE = b"metadata"

BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")

# §2.6.2 known metadata items
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")
KNOWN_METADATA = {FILE_PARAMETERS, VIRTUAL_DISK_SIZE, VIRTUAL_DISK_ID, LOGICAL_SECTOR_SIZE,
                  PHYSICAL_SECTOR_SIZE, PARENT_LOCATOR}

METADATA_TABLE_SIZE = 64 * KiB
MAX_TABLE_ENTRIES = 2047
MAX_DISK_SIZE = 64 * TiB
SECTORS_PER_BITMAP_BLOCK = 1 << 23  # §2.4: a 1 MiB sector bitmap block has 2^23 bits
MAX_SEQUENCE_FOR_WRITING = (1 << 64) - (1 << 32)   # leaves room for every header update of a session


def crc_valid(buf: bytes, checksum_offset: int = 4) -> bool:
    """VHDX checksums are CRC-32C over the structure with the checksum field taken as zero."""
    stored = struct.unpack_from("<I", buf, checksum_offset)[0]
    zeroed = bytearray(buf)
    zeroed[checksum_offset:checksum_offset + 4] = b"\0\0\0\0"
    return crc32c(zeroed) == stored


def with_crc(buf: bytearray, checksum_offset: int = 4) -> bytearray:
    buf[checksum_offset:checksum_offset + 4] = b"\0\0\0\0"
    struct.pack_into("<I", buf, checksum_offset, crc32c(buf))
    return buf


def guid_le(raw: bytes) -> uuid.UUID:
    return uuid.UUID(bytes_le=bytes(raw))


ZERO_GUID = uuid.UUID(int=0)


# ---------------------------------------------------------------- §2.2.1 file type identifier
def parse_file_identifier(buf: bytes, path: str | None = None) -> str:
    if len(buf) < 8 or buf[:8] != FILE_SIGNATURE:
        raise FormatError("file type identifier", 0, "signature is not 'vhdxfile'", path)
    creator = bytes(buf[8:8 + 512]).decode("utf-16-le", errors="replace")
    return creator.split("\0", 1)[0]


def pack_file_identifier(creator: str) -> bytes:
    out = bytearray(64 * KiB)
    out[:8] = FILE_SIGNATURE
    enc = creator.encode("utf-16-le")[:510]
    out[8:8 + len(enc)] = enc
    return bytes(out)


# ---------------------------------------------------------------- §2.2.2 headers
_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")


@dataclass(frozen=True)
class Header:
    sequence_number: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_version: int
    version: int
    log_length: int
    log_offset: int

    def pack(self) -> bytes:
        buf = bytearray(HEADER_SIZE)
        _HEADER.pack_into(buf, 0, HEADER_SIGNATURE, 0, self.sequence_number,
                          self.file_write_guid.bytes_le, self.data_write_guid.bytes_le,
                          self.log_guid.bytes_le, self.log_version, self.version,
                          self.log_length, self.log_offset)
        return bytes(with_crc(buf))

    def evolve(self, **changes) -> "Header":
        return replace(self, **changes)


def parse_header(buf: bytes, offset: int, path: str | None = None) -> Header:
    """Parse one header copy; raises FormatError if it is not *valid* in the §2.2.2 sense."""
    name = f"header {HEADER_OFFSETS.index(offset) + 1}" if offset in HEADER_OFFSETS else "header"
    if len(buf) < HEADER_SIZE:
        raise FormatError(name, offset, "truncated", path)
    sig, _, seq, fwg, dwg, lg, log_version, version, log_len, log_off = _HEADER.unpack_from(buf, 0)
    if sig != HEADER_SIGNATURE:
        raise FormatError(name, offset, "signature is not 'head'", path)
    if not crc_valid(buf[:HEADER_SIZE]):
        raise FormatError(name, offset, "CRC-32C checksum mismatch", path)
    return Header(seq, guid_le(fwg), guid_le(dwg), guid_le(lg), log_version, version, log_len, log_off)


def validate_header(h: Header, offset: int, path: str | None = None) -> None:
    """Field rules that make a valid header unusable (checked only on the current header)."""
    if h.version != 1:
        raise UnsupportedFeature("header", offset, f"Version is {h.version}, only 1 is defined", path)
    if h.log_guid != ZERO_GUID and h.log_version != 0:
        raise UnsupportedFeature("header", offset, f"LogVersion is {h.log_version}, only 0 is defined", path)
    if h.log_length == 0:
        raise FormatError("header", offset, "LogLength is zero: every VHDX has a log", path)
    if h.log_length % MiB or h.log_offset % MiB:
        raise FormatError("header", offset, f"log at {h.log_offset} of {h.log_length} bytes is not 1 MiB aligned",
                          path)
    if h.log_length and h.log_offset < HEADER_SECTION_SIZE:
        raise FormatError("header", offset, f"LogOffset {h.log_offset} overlaps the header section", path)


# ---------------------------------------------------------------- §2.2.3 region table
_REGION_HEADER = struct.Struct("<4sIII")
_REGION_ENTRY = struct.Struct("<16sQII")


@dataclass(frozen=True)
class RegionEntry:
    guid: uuid.UUID
    file_offset: int
    length: int
    required: bool


def parse_region_table(buf: bytes, offset: int, path: str | None = None) -> list[RegionEntry]:
    name = f"region table {REGION_TABLE_OFFSETS.index(offset) + 1}" if offset in REGION_TABLE_OFFSETS \
        else "region table"
    if len(buf) < REGION_TABLE_SIZE:
        raise FormatError(name, offset, "truncated", path)
    sig, _, count, _ = _REGION_HEADER.unpack_from(buf, 0)
    if sig != REGION_SIGNATURE:
        raise FormatError(name, offset, "signature is not 'regi'", path)
    if not crc_valid(buf[:REGION_TABLE_SIZE]):
        raise FormatError(name, offset, "CRC-32C checksum mismatch", path)
    if count > MAX_TABLE_ENTRIES:
        raise FormatError(name, offset, f"EntryCount {count} exceeds {MAX_TABLE_ENTRIES}", path)
    entries = []
    for i in range(count):
        at = 16 + i * _REGION_ENTRY.size
        g, foff, length, req = _REGION_ENTRY.unpack_from(buf, at)
        entry = RegionEntry(guid_le(g), foff, length, bool(req & 1))
        where = f"{name} entry {i}"
        if foff < MiB or foff % MiB or length % MiB:
            raise FormatError(where, offset + at, f"region at {foff} of {length} bytes is not 1 MiB aligned "
                              "after the header section", path)
        if any(e.guid == entry.guid for e in entries):
            raise FormatError(where, offset + at, f"duplicate region {entry.guid}", path)
        entries.append(entry)
    return entries


def pack_region_table(entries: list[RegionEntry]) -> bytes:
    buf = bytearray(REGION_TABLE_SIZE)
    _REGION_HEADER.pack_into(buf, 0, REGION_SIGNATURE, 0, len(entries), 0)
    for i, e in enumerate(entries):
        _REGION_ENTRY.pack_into(buf, 16 + i * _REGION_ENTRY.size, e.guid.bytes_le, e.file_offset, e.length,
                                int(e.required))
    return bytes(with_crc(buf))


# ---------------------------------------------------------------- §2.6 metadata region
_MD_HEADER = struct.Struct("<8sHH20s")
_MD_ENTRY = struct.Struct("<16sIIII")


@dataclass(frozen=True)
class MetadataEntry:
    item_id: uuid.UUID
    offset: int
    length: int
    is_user: bool
    is_virtual_disk: bool
    is_required: bool

    def flags(self) -> int:
        return int(self.is_user) | int(self.is_virtual_disk) << 1 | int(self.is_required) << 2


def parse_metadata_table(buf: bytes, region_offset: int, region_length: int,
                         path: str | None = None) -> list[MetadataEntry]:
    if len(buf) < METADATA_TABLE_SIZE:
        raise FormatError("metadata table", region_offset, "truncated", path)
    sig, _, count, _ = _MD_HEADER.unpack_from(buf, 0)
    if sig != METADATA_SIGNATURE:
        raise FormatError("metadata table", region_offset, "signature is not 'metadata'", path)
    if count > MAX_TABLE_ENTRIES:
        raise FormatError("metadata table", region_offset, f"EntryCount {count} exceeds {MAX_TABLE_ENTRIES}", path)
    entries: list[MetadataEntry] = []
    for i in range(count):
        at = 32 + i * _MD_ENTRY.size
        g, off, length, flags, _ = _MD_ENTRY.unpack_from(buf, at)
        e = MetadataEntry(guid_le(g), off, length, bool(flags & 1), bool(flags & 2), bool(flags & 4))
        where = f"metadata table entry {i} ({e.item_id})"
        if length == 0 and off != 0:
            raise FormatError(where, region_offset + at, "empty item with a nonzero Offset", path)
        if length and (off < METADATA_TABLE_SIZE or off + length > region_length or length > MiB):
            raise FormatError(where, region_offset + at,
                              f"item at {off} of {length} bytes falls outside the metadata region", path)
        for other in entries:
            if other.item_id == e.item_id and other.is_user == e.is_user:
                raise FormatError(where, region_offset + at, "duplicate metadata item", path)
            if length and other.length and off < other.offset + other.length and other.offset < off + length:
                raise FormatError(where, region_offset + at, f"item overlaps item {other.item_id}", path)
        if e.is_required and (e.is_user or e.item_id not in KNOWN_METADATA):
            raise UnsupportedFeature(where, region_offset + at, "required metadata item is not understood", path)
        entries.append(e)
    if sum(e.is_user for e in entries) > 1024:
        raise FormatError("metadata table", region_offset, "more than 1024 user metadata items", path)
    return entries


def pack_metadata_table(entries: list[MetadataEntry]) -> bytes:
    buf = bytearray(METADATA_TABLE_SIZE)
    _MD_HEADER.pack_into(buf, 0, METADATA_SIGNATURE, 0, len(entries), b"")
    for i, e in enumerate(entries):
        _MD_ENTRY.pack_into(buf, 32 + i * _MD_ENTRY.size, e.item_id.bytes_le, e.offset, e.length, e.flags(), 0)
    return bytes(buf)


@dataclass(frozen=True)
class FileParameters:
    block_size: int
    leave_block_allocated: bool
    has_parent: bool

    def pack(self) -> bytes:
        return struct.pack("<II", self.block_size, int(self.leave_block_allocated) | int(self.has_parent) << 1)


def parse_file_parameters(raw: bytes, at: int, path: str | None = None) -> FileParameters:
    if len(raw) < 8:
        raise FormatError("file parameters metadata item", at, "shorter than 8 bytes", path)
    block_size, flags = struct.unpack_from("<II", raw)
    if block_size < MiB or block_size > 256 * MiB or block_size & (block_size - 1):
        raise FormatError("file parameters metadata item", at,
                          f"BlockSize {block_size} is not a power of two between 1 MiB and 256 MiB", path)
    return FileParameters(block_size, bool(flags & 1), bool(flags & 2))


def parse_u32_item(raw: bytes, at: int, name: str, allowed: tuple[int, ...], path: str | None = None) -> int:
    if len(raw) < 4:
        raise FormatError(f"{name} metadata item", at, "shorter than 4 bytes", path)
    value = struct.unpack_from("<I", raw)[0]
    if value not in allowed:
        raise FormatError(f"{name} metadata item", at, f"value {value} is not one of {allowed}", path)
    return value


def parse_disk_size(raw: bytes, at: int, logical_sector_size: int, path: str | None = None) -> int:
    if len(raw) < 8:
        raise FormatError("virtual disk size metadata item", at, "shorter than 8 bytes", path)
    size = struct.unpack_from("<Q", raw)[0]
    if size == 0 or size > MAX_DISK_SIZE or size % logical_sector_size:
        raise FormatError("virtual disk size metadata item", at,
                          f"VirtualDiskSize {size} is zero, above 64 TiB, or not a multiple of the "
                          f"{logical_sector_size}-byte logical sector", path)
    return size


# ---------------------------------------------------------------- §2.6.2.6 parent locator
@dataclass
class ParentLocator:
    locator_type: uuid.UUID = VHDX_LOCATOR_TYPE
    entries: dict[str, str] = field(default_factory=dict)

    def pack(self) -> bytes:
        keys = list(self.entries)
        table_end = 20 + 12 * len(keys)
        blob = bytearray()
        table = bytearray()
        for k in keys:
            kb, vb = k.encode("utf-16-le"), self.entries[k].encode("utf-16-le")
            koff = table_end + len(blob)
            blob += kb
            voff = table_end + len(blob)
            blob += vb
            table += struct.pack("<IIHH", koff, voff, len(kb), len(vb))
        head = self.locator_type.bytes_le + struct.pack("<HH", 0, len(keys))
        return bytes(head + table + blob)


def parse_parent_locator(raw: bytes, at: int, path: str | None = None) -> ParentLocator:
    name = "parent locator metadata item"
    if len(raw) < 20:
        raise FormatError(name, at, "shorter than its 20-byte header", path)
    ltype = guid_le(raw[:16])
    _, count = struct.unpack_from("<HH", raw, 16)
    if 20 + 12 * count > len(raw):
        raise FormatError(name, at, f"{count} key-value entries do not fit in {len(raw)} bytes", path)
    entries: dict[str, str] = {}
    for i in range(count):
        koff, voff, klen, vlen = struct.unpack_from("<IIHH", raw, 20 + 12 * i)
        if not (koff and voff and klen and vlen) or koff + klen > len(raw) or voff + vlen > len(raw):
            raise FormatError(name, at + 20 + 12 * i, f"entry {i} key/value lies outside the item", path)
        try:
            key = bytes(raw[koff:koff + klen]).decode("utf-16-le")
            value = bytes(raw[voff:voff + vlen]).decode("utf-16-le")
        except UnicodeDecodeError:
            raise FormatError(name, at + 20 + 12 * i, f"entry {i} is not valid UTF-16", path) from None
        if key in entries:
            raise FormatError(name, at + 20 + 12 * i, f"duplicate key {key!r}", path)
        entries[key] = value
    return ParentLocator(ltype, entries)


# ---------------------------------------------------------------- §2.5 BAT geometry
def chunk_ratio(block_size: int, logical_sector_size: int) -> int:
    return SECTORS_PER_BITMAP_BLOCK * logical_sector_size // block_size


def bat_geometry(disk_size: int, block_size: int, logical_sector_size: int, has_parent: bool):
    """(payload blocks, sector bitmap blocks, chunk ratio, total BAT entries) per §2.5."""
    ratio = chunk_ratio(block_size, logical_sector_size)
    payload = -(-disk_size // block_size)
    bitmaps = -(-payload // ratio)
    total = bitmaps * (ratio + 1) if has_parent else payload + (payload - 1) // ratio
    return payload, bitmaps, ratio, total

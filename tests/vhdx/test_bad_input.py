"""Bad VHDX input: every damaged file is refused with the precise exception class, a message naming the
structure and the file offset where it broke, and not one byte written to it (read-only *and* read-write
opens). The damage is made by patching bytes at the offsets MS-VHDX §2 gives; the layout of each image
is read back with plain struct code here (not the engine's parsers), and checksums are recomputed only
when a test wants a valid CRC-32C over a bad field.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import uuid
from dataclasses import dataclass

import pytest

from replicator.errors import FormatError, LogReplayRequired, ParentError, ReplicatorError, UnsupportedFeature
from replicator.kernels import crc32c
from replicator.vhdx import VhdxDisk, create_vhdx
from replicator.vhdx.check import check_vhdx
from replicator.vhdx.log import DataUpdate, ZeroUpdate, encode_entry

from ..externals import run
from .crashio import SimulatedCrash, crashing_io

KiB, MiB = 1 << 10, 1 << 20
HEADERS = (64 * KiB, 128 * KiB)
REGION_TABLES = (192 * KiB, 256 * KiB)
BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
ITEM_NAMES = {FILE_PARAMETERS: "file parameters", VIRTUAL_DISK_SIZE: "virtual disk size",
              VIRTUAL_DISK_ID: "virtual disk id", LOGICAL_SECTOR_SIZE: "logical sector size",
              PHYSICAL_SECTOR_SIZE: "physical sector size", PARENT_LOCATOR: "parent locator"}
FULLY_PRESENT = 6
SIZE = 8 * MiB


# ------------------------------------------------------------------------------------------ file helpers
def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_at(path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def write_at(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def fix_crc(buf: bytearray) -> bytearray:
    """CRC-32C over the structure with its checksum field (bytes 4..8) taken as zero."""
    buf[4:8] = b"\0\0\0\0"
    struct.pack_into("<I", buf, 4, crc32c(bytes(buf)))
    return buf


def patch_header(path, slot: int, fix: bool = True, **fields) -> None:
    """Rewrite header fields of one copy (§2.2.2 offsets), then recompute its checksum."""
    at = HEADERS[slot]
    buf = bytearray(read_at(path, at, 4 * KiB))
    layout = {"sequence_number": (8, "<Q"), "log_guid": (48, "16s"), "log_version": (64, "<H"),
              "version": (66, "<H"), "log_length": (68, "<I"), "log_offset": (72, "<Q"),
              "data_write_guid": (32, "16s")}
    for name, value in fields.items():
        off, fmt = layout[name]
        struct.pack_into(fmt, buf, off, value.bytes_le if isinstance(value, uuid.UUID) else value)
    write_at(path, at, bytes(fix_crc(buf) if fix else buf))


@dataclass
class Layout:
    """Where one image keeps its structures, read with struct at the spec's offsets."""

    file_size: int
    headers: list          # (sequence_number, log_guid, log_length, log_offset) per copy
    regions: list          # (guid, file_offset, length, required), table 1
    md_offset: int
    md_entries: list       # (guid, offset, length, flags)
    bat_offset: int
    bat: list

    @property
    def log_offset(self) -> int:
        return self.headers[0][3]

    def item(self, guid) -> tuple[int, int]:
        """(absolute file offset, index in the table) of a metadata item."""
        for i, (g, off, _, _) in enumerate(self.md_entries):
            if g == guid:
                return self.md_offset + off, i
        raise KeyError(guid)

    def block_offset(self, block: int) -> int:
        entry = self.bat[block]           # chunk ratio is 4096 for these images: payload block b is entry b
        assert entry & 7 == FULLY_PRESENT
        return entry & ~0xFFFFF


def layout(path) -> Layout:
    raw = read_at(path, 0, 4 * MiB)
    headers = []
    for at in HEADERS:
        seq, = struct.unpack_from("<Q", raw, at + 8)
        log_guid = uuid.UUID(bytes_le=raw[at + 48:at + 64])
        log_len, log_off = struct.unpack_from("<IQ", raw, at + 68)
        headers.append((seq, log_guid, log_len, log_off))
    count, = struct.unpack_from("<I", raw, REGION_TABLES[0] + 8)
    regions = []
    for i in range(count):
        at = REGION_TABLES[0] + 16 + 32 * i
        g = uuid.UUID(bytes_le=raw[at:at + 16])
        off, length, req = struct.unpack_from("<QII", raw, at + 16)
        regions.append((g, off, length, req))
    md_off = next(off for g, off, _, _ in regions if g == METADATA_GUID)
    bat_off = next(off for g, off, _, _ in regions if g == BAT_GUID)
    assert raw[md_off:md_off + 8] == b"metadata"
    n, = struct.unpack_from("<H", raw, md_off + 10)
    entries = []
    for i in range(n):
        at = md_off + 32 + 32 * i
        g = uuid.UUID(bytes_le=raw[at:at + 16])
        off, length, flags = struct.unpack_from("<III", raw, at + 16)
        entries.append((g, off, length, flags))
    bat = list(struct.unpack_from("<8Q", raw, bat_off))
    return Layout(os.path.getsize(path), headers, regions, md_off, entries, bat_off, bat)


def expect_refused(path, exc, structure: str | None, offset: int | None, *contains: str) -> str:
    """Both a read-only and a read-write open raise exactly `exc`; a FormatError names `structure` and
    `offset` (attribute and message); the file's bytes are the same afterwards. Returns the message."""
    path = str(path)
    before = sha(path)
    message = ""
    for read_only in (True, False):
        with pytest.raises(exc) as info:
            VhdxDisk.open(path, read_only=read_only)
        err = info.value
        assert type(err) is exc, f"{type(err).__name__}: {err}"
        message = str(err)
        if structure is not None:
            assert err.structure == structure, message
            assert structure in message
        if offset is not None:
            assert err.offset == offset, message
            assert f"offset {offset} (0x{offset:x})" in message
        for text in contains:
            assert text in message, message
        assert sha(path) == before, f"a failed {'read-only' if read_only else 'read-write'} open wrote to {path}"
    return message


def disk_bytes(path, read_only: bool = True) -> bytes:
    with VhdxDisk.open(str(path), read_only=read_only) as d:
        return d.read(0, d.size)


# ------------------------------------------------------------------------------------------ images
def _ours(path) -> bytes:
    with create_vhdx(str(path), SIZE, block_size=MiB) as d:
        d.write(0, b"\x11" * MiB)
        d.write(3 * MiB + 512, b"\x22" * 5000)
    expected = bytearray(SIZE)
    expected[:MiB] = b"\x11" * MiB
    expected[3 * MiB + 512:3 * MiB + 5512] = b"\x22" * 5000
    return bytes(expected)


def _qemu(path) -> bytes:
    run("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M,subformat=dynamic", path, SIZE)
    run("qemu-io", "-f", "vhdx", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x6b 5M 4k", path)
    expected = bytearray(SIZE)
    expected[:MiB] = b"\x5a" * MiB
    expected[5 * MiB:5 * MiB + 4096] = b"\x6b" * 4096
    return bytes(expected)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    return {name: (str(root / f"{name}.vhdx"), make(root / f"{name}.vhdx"))
            for name, make in (("ours", _ours), ("qemu", _qemu))}


@dataclass
class Image:
    path: str
    expected: bytes
    layout: Layout
    # the one data block both images have at virtual block 0, and the second one
    second_block: int


@pytest.fixture
def image_factory(pristine, tmp_path):
    def make(kind: str = "ours") -> Image:
        src, expected = pristine[kind]
        dst = str(tmp_path / f"{kind}.vhdx")
        shutil.copy(src, dst)
        return Image(dst, expected, layout(dst), 3 if kind == "ours" else 5)
    return make


@pytest.fixture(params=["ours", "qemu"])
def image(request, image_factory) -> Image:
    return image_factory(request.param)


@pytest.fixture
def ours(image_factory) -> Image:
    return image_factory("ours")


def test_pristine_images_open_and_read_as_written(image):
    """The baseline every corruption starts from: both images open, read right, check clean."""
    lay = image.layout
    assert lay.bat[0] & 7 == FULLY_PRESENT and lay.bat[image.second_block] & 7 == FULLY_PRESENT
    assert disk_bytes(image.path) == image.expected
    assert check_vhdx(image.path) == []
    before = sha(image.path)
    assert disk_bytes(image.path, read_only=False) == image.expected
    assert sha(image.path) == before, "a read-write open that changes nothing must write nothing"


# ------------------------------------------------------------------------------------------ truncation
@pytest.mark.parametrize("cut", [0, 1000, 66 * KiB, 100 * KiB, 200 * KiB, 300 * KiB, MiB - 1])
def test_truncated_inside_header_section(image, cut):
    os.truncate(image.path, cut)
    if cut < 8:
        expect_refused(image.path, FormatError, "file type identifier", 0)
    elif cut < HEADERS[0] + 4 * KiB:                       # no complete header copy
        expect_refused(image.path, FormatError, "headers", HEADERS[0], "truncated")
    elif cut < REGION_TABLES[0] + 64 * KiB:                # header 1 survived, no complete region table
        expect_refused(image.path, FormatError, "region tables", REGION_TABLES[0], "truncated")
    else:
        expect_refused(image.path, FormatError, "region table", REGION_TABLES[0], "past the end of the file")


def test_truncated_inside_metadata_region(image):
    lay = image.layout
    os.truncate(image.path, lay.md_offset + 40 * KiB)
    msg = expect_refused(image.path, FormatError, "region table", REGION_TABLES[0], "past the end of the file")
    # the region that does not fit is named (the metadata region, or the BAT if it lies further on)
    assert "metadata region" in msg or ("BAT region" in msg and lay.bat_offset > lay.md_offset)


def test_truncated_inside_bat(image):
    lay = image.layout
    os.truncate(image.path, lay.bat_offset + 4 * KiB)
    msg = expect_refused(image.path, FormatError, "region table", REGION_TABLES[0], "past the end of the file")
    assert "BAT region" in msg or "metadata region" in msg


@pytest.mark.parametrize("where", ["first block", "second block"])
def test_truncated_inside_payload_block(image, where):
    lay = image.layout
    block = 0 if where == "first block" else image.second_block
    start = lay.block_offset(block)
    # cut half-way into the block: every block at or after the cut is now outside the file
    os.truncate(image.path, start + MiB // 2)
    first_bad = min(b for b in (0, image.second_block) if lay.block_offset(b) + MiB > start + MiB // 2)
    expect_refused(image.path, FormatError, f"BAT entry {first_bad} (payload block {first_bad})",
                   lay.bat_offset + 8 * first_bad, "outside the file")


def test_truncated_fixed_disk(tmp_path):
    path = str(tmp_path / "fixed.vhdx")
    create_vhdx(path, 4 * MiB, block_size=MiB, fixed=True).close()
    lay = layout(path)
    os.truncate(path, lay.file_size - 4096)
    expect_refused(path, FormatError, "BAT entry 3 (payload block 3)", lay.bat_offset + 24, "outside the file")


# ------------------------------------------------------------------------------------------ signatures, copies
def test_wrong_file_signature(image):
    write_at(image.path, 0, b"vhdxfilf")
    expect_refused(image.path, FormatError, "file type identifier", 0, "vhdxfile")


@pytest.mark.parametrize("slot", [0, 1])
def test_bad_checksum_in_one_header_copy_opens_via_the_other(image, slot):
    at = HEADERS[slot]
    buf = bytearray(read_at(image.path, at, 4 * KiB))
    buf[1000] ^= 0x40                                       # reserved area, covered by the checksum
    write_at(image.path, at, bytes(buf))
    before = sha(image.path)
    assert disk_bytes(image.path) == image.expected
    assert disk_bytes(image.path, read_only=False) == image.expected
    assert sha(image.path) == before
    problems = check_vhdx(image.path)
    assert len(problems) == 1 and f"header {slot + 1} at offset {at} " in problems[0], problems
    assert "checksum" in problems[0].lower()
    # the next modification rewrites both copies, so the damaged one is repaired
    with VhdxDisk.open(image.path, read_only=False) as d:
        d.write(7 * MiB, b"\x77" * 4096)
    fixed = bytearray(image.expected)
    fixed[7 * MiB:7 * MiB + 4096] = b"\x77" * 4096
    assert disk_bytes(image.path) == bytes(fixed)
    assert check_vhdx(image.path) == []


@pytest.mark.parametrize("slot", [0, 1])
def test_bad_checksum_in_one_region_table_copy_opens_via_the_other(image, slot):
    at = REGION_TABLES[slot]
    buf = bytearray(read_at(image.path, at, 64 * KiB))
    buf[60000] ^= 0x01
    write_at(image.path, at, bytes(buf))
    before = sha(image.path)
    assert disk_bytes(image.path) == image.expected
    assert disk_bytes(image.path, read_only=False) == image.expected
    assert sha(image.path) == before
    problems = check_vhdx(image.path)
    assert any(f"region table {slot + 1} at offset {at} " in p and "checksum" in p.lower() for p in problems), \
        problems


def test_higher_sequence_header_wins_but_a_valid_lower_one_is_fallback(ours):
    """Which copy is current is decided by SequenceNumber among *valid* copies (§2.2.2.1)."""
    lay = ours.layout
    current = max((0, 1), key=lambda s: lay.headers[s][0])
    # Version 2 with a valid checksum in the current copy: it is the one in use, and it is refused
    patch_header(ours.path, current, version=2)
    expect_refused(ours.path, UnsupportedFeature, "header", HEADERS[current], "Version is 2")
    # break its checksum instead: the older copy is used and the disk opens
    buf = bytearray(read_at(ours.path, HEADERS[current], 4 * KiB))
    buf[4] ^= 0xFF
    write_at(ours.path, HEADERS[current], bytes(buf))
    assert disk_bytes(ours.path) == ours.expected


def test_both_header_copies_bad(image):
    for at in HEADERS:
        buf = bytearray(read_at(image.path, at, 4 * KiB))
        buf[8] ^= 0x01                                      # SequenceNumber, checksum not fixed
        write_at(image.path, at, bytes(buf))
    msg = expect_refused(image.path, FormatError, "headers", HEADERS[0], "neither header copy is valid")
    assert f"header 1 at offset {HEADERS[0]} " in msg and f"header 2 at offset {HEADERS[1]} " in msg


def test_both_header_signatures_bad(image):
    for at in HEADERS:
        write_at(image.path, at, b"HEAD")
    msg = expect_refused(image.path, FormatError, "headers", HEADERS[0])
    assert msg.count("signature is not 'head'") == 2


def test_both_region_table_copies_bad(image):
    for at in REGION_TABLES:
        buf = bytearray(read_at(image.path, at, 64 * KiB))
        buf[16] ^= 0x01                                     # first entry's GUID, checksum not fixed
        write_at(image.path, at, bytes(buf))
    msg = expect_refused(image.path, FormatError, "region tables", REGION_TABLES[0],
                         "neither region table copy is valid")
    assert f"region table 1 at offset {REGION_TABLES[0]} " in msg
    assert f"region table 2 at offset {REGION_TABLES[1]} " in msg


# ------------------------------------------------------------------------------------------ BAT
def set_bat_entry(img: Image, index: int, value: int) -> None:
    write_at(img.path, img.layout.bat_offset + 8 * index, struct.pack("<Q", value))


def test_bat_entry_pointing_outside_the_file(image):
    set_bat_entry(image, 1, 100 * MiB | FULLY_PRESENT)
    expect_refused(image.path, FormatError, "BAT entry 1 (payload block 1)", image.layout.bat_offset + 8,
                   "outside the file", str(image.layout.file_size))


def test_bat_entry_straddling_the_end_of_the_file(image):
    """The block starts inside the file but its last byte is past the end."""
    end = image.layout.file_size
    set_bat_entry(image, 2, end | FULLY_PRESENT)
    os.truncate(image.path, end + MiB // 2)
    expect_refused(image.path, FormatError, "BAT entry 2 (payload block 2)", image.layout.bat_offset + 16,
                   "outside the file")


@pytest.mark.parametrize("target", ["header section", "log", "metadata region", "BAT region"])
def test_bat_entry_pointing_into_a_reserved_area(image, target):
    lay = image.layout
    where = {"header section": 0, "log": lay.log_offset, "metadata region": lay.md_offset,
             "BAT region": lay.bat_offset}[target]
    set_bat_entry(image, 1, where | FULLY_PRESENT)
    expect_refused(image.path, FormatError, "BAT entry 1 (payload block 1)", lay.bat_offset + 8, target)


@pytest.mark.parametrize("offset", [0xFFFFFFFFFFF00000, 1 << 63, (1 << 44) - MiB])
def test_bat_entry_at_the_top_of_the_offset_range(ours, offset):
    """FileOffsetMB is 44 bits: the largest values must be outside the file too, even where offset +
    block size no longer fits in 64 bits (2^64 - 1 MiB + 1 MiB wraps to 0)."""
    set_bat_entry(ours, 1, offset | FULLY_PRESENT)
    expect_refused(ours.path, FormatError, "BAT entry 1 (payload block 1)", ours.layout.bat_offset + 8,
                   "outside the file")
    problems = check_vhdx(ours.path)
    assert any(f"offset {ours.layout.bat_offset + 8} " in p for p in problems), problems


def test_two_bat_entries_pointing_at_the_same_block(image):
    lay = image.layout
    set_bat_entry(image, 1, lay.block_offset(0) | FULLY_PRESENT)
    msg = expect_refused(image.path, FormatError, "BAT entry 1 (payload block 1)", lay.bat_offset + 8, "overlaps")
    assert "BAT entry 0" in msg


def test_bat_entry_with_unknown_state(ours):
    set_bat_entry(ours, 1, 4)                               # state 4 is undefined for payload blocks
    expect_refused(ours.path, FormatError, "BAT entry 1 (payload block 1)", ours.layout.bat_offset + 8, "state 4")


def test_partially_present_in_a_non_differencing_disk(ours):
    set_bat_entry(ours, 0, ours.layout.block_offset(0) | 7)
    expect_refused(ours.path, FormatError, "BAT entry 0 (payload block 0)", ours.layout.bat_offset, "state 7")


# ------------------------------------------------------------------------------------------ metadata
@pytest.mark.parametrize("block_size", [0, 512 * KiB, MiB - 1, MiB + 1, 3 * MiB, 512 * MiB, 1 << 31])
def test_block_size_out_of_range_or_not_a_power_of_two(image, block_size):
    at, _ = image.layout.item(FILE_PARAMETERS)
    write_at(image.path, at, struct.pack("<I", block_size))
    expect_refused(image.path, FormatError, "file parameters metadata item", at, f"BlockSize {block_size} ")


def test_logical_sector_size_1024(image):
    at, _ = image.layout.item(LOGICAL_SECTOR_SIZE)
    write_at(image.path, at, struct.pack("<I", 1024))
    expect_refused(image.path, FormatError, "logical sector size metadata item", at, "1024")


def test_physical_sector_size_1024(image):
    at, _ = image.layout.item(PHYSICAL_SECTOR_SIZE)
    write_at(image.path, at, struct.pack("<I", 1024))
    expect_refused(image.path, FormatError, "physical sector size metadata item", at, "1024")


@pytest.mark.parametrize("size", [0, 1000, (64 << 40) + 4096])
def test_bad_virtual_disk_size(image, size):
    at, _ = image.layout.item(VIRTUAL_DISK_SIZE)
    write_at(image.path, at, struct.pack("<Q", size))
    expect_refused(image.path, FormatError, "virtual disk size metadata item", at, f"VirtualDiskSize {size} ")


def add_region(img: Image, guid: uuid.UUID, required: bool) -> None:
    """A well-formed third region (1 MiB at the end of the file, file extended) in both table copies."""
    offset = -(-img.layout.file_size // MiB) * MiB
    os.truncate(img.path, offset + MiB)
    for at in REGION_TABLES:
        buf = bytearray(read_at(img.path, at, 64 * KiB))
        count, = struct.unpack_from("<I", buf, 8)
        struct.pack_into("<16sQII", buf, 16 + 32 * count, guid.bytes_le, offset, MiB, int(required))
        struct.pack_into("<I", buf, 8, count + 1)
        write_at(img.path, at, bytes(fix_crc(buf)))


def test_unknown_required_region(image):
    guid = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
    add_region(image, guid, required=True)
    expect_refused(image.path, UnsupportedFeature, "region table", REGION_TABLES[0], str(guid), "not understood")


def test_unknown_optional_region_is_ignored(image):
    add_region(image, uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"), required=False)
    assert disk_bytes(image.path) == image.expected


def add_metadata_item(img: Image, guid: uuid.UUID, flags: int) -> int:
    """Append an 8-byte item (at metadata offset 192 KiB, free in both layouts); returns its entry offset."""
    lay = img.layout
    n = len(lay.md_entries)
    entry_at = lay.md_offset + 32 + 32 * n
    write_at(img.path, entry_at, struct.pack("<16sIIII", guid.bytes_le, 192 * KiB, 8, flags, 0))
    write_at(img.path, lay.md_offset + 10, struct.pack("<H", n + 1))
    write_at(img.path, lay.md_offset + 192 * KiB, b"userdata")
    return entry_at


def test_unknown_required_metadata_item(image):
    guid = uuid.UUID("11111111-2222-3333-4444-555555555555")
    entry_at = add_metadata_item(image, guid, flags=0b100)          # IsRequired
    n = len(image.layout.md_entries)
    expect_refused(image.path, UnsupportedFeature, f"metadata table entry {n} ({guid})", entry_at,
                   "not understood")


def test_unknown_required_user_metadata_item(image):
    """§2.6.1.2 IsRequired: 'If this field is set to True and the implementation does not recognize this
    metadata item, the implementation MUST fail to load the file' -- for user items too (qemu refuses)."""
    guid = uuid.UUID("11111111-2222-3333-4444-555555555555")
    entry_at = add_metadata_item(image, guid, flags=0b101)          # IsUser | IsRequired
    n = len(image.layout.md_entries)
    expect_refused(image.path, UnsupportedFeature, f"metadata table entry {n} ({guid})", entry_at,
                   "not understood")


@pytest.mark.parametrize("flags", [0b000, 0b001, 0b011])
def test_unknown_optional_metadata_item_is_ignored(image, flags):
    add_metadata_item(image, uuid.UUID("11111111-2222-3333-4444-555555555555"), flags)
    assert disk_bytes(image.path) == image.expected


@pytest.mark.parametrize("item", [FILE_PARAMETERS, VIRTUAL_DISK_SIZE, VIRTUAL_DISK_ID, LOGICAL_SECTOR_SIZE,
                                  PHYSICAL_SECTOR_SIZE], ids=lambda g: ITEM_NAMES[g].replace(" ", "_"))
def test_missing_required_metadata_item(image, item):
    lay = image.layout
    _, index = lay.item(item)
    table = bytearray(read_at(image.path, lay.md_offset, 64 * KiB))
    n = len(lay.md_entries)
    rows = [table[32 + 32 * i:64 + 32 * i] for i in range(n) if i != index]
    table[32:32 + 32 * n] = b"".join(rows) + bytes(32)
    struct.pack_into("<H", table, 10, n - 1)
    write_at(image.path, lay.md_offset, bytes(table))
    expect_refused(image.path, FormatError, "metadata table", lay.md_offset, ITEM_NAMES[item], "missing")


def test_metadata_item_outside_the_region(ours):
    lay = ours.layout
    at, index = lay.item(VIRTUAL_DISK_SIZE)
    entry_at = lay.md_offset + 32 + 32 * index
    write_at(ours.path, entry_at + 16, struct.pack("<I", MiB - 4))   # 8 bytes at MiB-4: crosses the region end
    expect_refused(ours.path, FormatError, f"metadata table entry {index} ({VIRTUAL_DISK_SIZE})", entry_at,
                   "outside the metadata region")


def test_metadata_table_signature(image):
    write_at(image.path, image.layout.md_offset, b"METADATA")
    expect_refused(image.path, FormatError, "metadata table", image.layout.md_offset, "signature")


# ------------------------------------------------------------------------------------------ parents
@pytest.fixture
def chain(tmp_path):
    parent, child = str(tmp_path / "parent.vhdx"), str(tmp_path / "child.vhdx")
    with create_vhdx(parent, SIZE, block_size=MiB) as p:
        p.write(0, b"\xaa" * (2 * MiB))
    with create_vhdx(child, 0, parent=parent, block_size=MiB) as c:
        c.write(MiB + 512, b"\xbb" * 1024)
    expected = bytearray(SIZE)
    expected[:2 * MiB] = b"\xaa" * (2 * MiB)
    expected[MiB + 512:MiB + 1536] = b"\xbb" * 1024
    assert disk_bytes(child) == bytes(expected)
    return parent, child


def test_differencing_disk_whose_parent_was_modified(chain):
    parent, child = chain
    with VhdxDisk.open(parent, read_only=False) as p:
        old_guid = p.data_write_guid
        p.write(4 * MiB, b"\xcc" * 4096)
        assert p.data_write_guid != old_guid
    parent_sha = sha(parent)
    msg = expect_refused(child, ParentError, None, None, parent, str(old_guid))
    assert "modified" in msg
    assert sha(parent) == parent_sha


def test_differencing_disk_whose_parent_was_replaced(chain, tmp_path):
    parent, child = chain
    os.unlink(parent)
    with create_vhdx(parent, SIZE, block_size=MiB) as p:
        p.write(0, b"\xaa" * (2 * MiB))                     # same bytes, different disk
    expect_refused(child, ParentError, None, None, parent)


def test_differencing_disk_with_missing_parent(chain):
    parent, child = chain
    os.rename(parent, parent + ".moved")
    msg = expect_refused(child, ParentError, None, None, "not found")
    assert os.path.abspath(parent) in msg


def test_differencing_disk_whose_parent_is_corrupt(chain):
    """A broken parent is reported as such (with the parent's structure and offset), child untouched."""
    parent, child = chain
    write_at(parent, 0, b"XXXXXXXX")
    parent_sha = sha(parent)
    expect_refused(child, FormatError, "file type identifier", 0, parent)
    assert sha(parent) == parent_sha


def test_differencing_disk_without_parent_locator(chain):
    parent, child = chain
    lay = layout(child)
    _, index = lay.item(PARENT_LOCATOR)
    n = len(lay.md_entries)
    assert index == n - 1
    write_at(child, lay.md_offset + 32 + 32 * index, bytes(32))
    write_at(child, lay.md_offset + 10, struct.pack("<H", n - 1))
    expect_refused(child, FormatError, "metadata table", lay.md_offset, "parent locator", "missing")


def rewrite_locator(child: str, **entries) -> None:
    """Replace parent locator key/values (the item is the last one in the region, so it may grow)."""
    from replicator.vhdx.structures import parse_parent_locator
    lay = layout(child)
    at, index = lay.item(PARENT_LOCATOR)
    length = lay.md_entries[index][2]
    loc = parse_parent_locator(read_at(child, at, length), at)
    loc.entries.update(entries)
    raw = loc.pack()
    write_at(child, at, raw)
    write_at(child, lay.md_offset + 32 + 32 * index + 20, struct.pack("<I", len(raw)))


def test_differencing_disk_that_is_its_own_parent(chain):
    parent, child = chain
    with VhdxDisk.open(child) as c:
        own = "{" + str(c.data_write_guid) + "}"
    rewrite_locator(child, relative_path="child.vhdx", absolute_win32_path="\\\\?\\" + child,
                    parent_linkage=own)
    expect_refused(child, ParentError, None, None, "loop")


def test_parent_with_other_logical_sector_size(chain, tmp_path):
    """A parent whose DataWriteGuid matches the linkage but whose sectors are 4 KiB: refused."""
    parent, child = chain
    with VhdxDisk.open(parent) as p:
        linkage = p.data_write_guid
    os.unlink(parent)
    create_vhdx(parent, SIZE, block_size=MiB, logical_sector_size=4096).close()
    for slot in (0, 1):
        patch_header(parent, slot, data_write_guid=linkage)
    expect_refused(child, ParentError, None, None, "4096")


# ------------------------------------------------------------------------------------------ log
LOG_GUID = uuid.UUID("6a1a0e5c-9a0b-4d6e-8f3c-2b7d5e4f1a90")


def stage_log_entry(img: Image, *, corrupt: str | None = None) -> dict:
    """Put one log entry at the start of the log and set LogGuid in both headers (CRC fixed), as if a
    writer crashed after logging but before updating in place. The entry: 4 KiB of 0xAB over the start of
    block 0, zeroes the first 4 KiB of the second data block, and a BAT page that allocates block 6 at the
    end of the file (LastFileOffset extends the file by 1 MiB). Returns what replay must produce."""
    lay = img.layout
    end = lay.file_size
    bat_page = bytearray(read_at(img.path, lay.bat_offset, 4096))
    struct.pack_into("<Q", bat_page, 8 * 6, end | FULLY_PRESENT)
    second = lay.block_offset(img.second_block)
    updates = [DataUpdate(lay.block_offset(0), b"\xab" * 4096), ZeroUpdate(second, 4096),
               DataUpdate(lay.bat_offset, bytes(bat_page))]
    guid = LOG_GUID if corrupt != "guid" else uuid.uuid4()
    blob = bytearray(encode_entry(updates, sequence_number=5, log_guid=guid, tail=0,
                                  flushed_file_offset=end, last_file_offset=end + MiB))
    if corrupt == "checksum":
        blob[4096 + 100] ^= 0x10                            # inside the first data sector
    elif corrupt == "signature":
        blob[:4] = b"LOGE"
    write_at(img.path, lay.log_offset, bytes(blob))
    for slot in (0, 1):
        patch_header(img.path, slot, log_guid=LOG_GUID)
    expected = bytearray(img.expected)
    expected[:4096] = b"\xab" * 4096
    v = img.second_block * MiB
    expected[v:v + 4096] = bytes(4096)
    return {"expected": bytes(expected), "size": end + MiB}


def test_read_only_open_with_pending_log_needs_replay_and_read_write_replays(image):
    want = stage_log_entry(image)
    before = sha(image.path)
    for _ in range(2):
        with pytest.raises(LogReplayRequired) as info:
            VhdxDisk.open(image.path, read_only=True)
        assert "replay" in str(info.value) and str(LOG_GUID) in str(info.value)
        assert sha(image.path) == before
    assert any("replay" in p for p in check_vhdx(image.path))
    assert sha(image.path) == before
    with VhdxDisk.open(image.path, read_only=False) as d:
        assert d.read(0, d.size) == want["expected"]
        assert any(e.kind.value == "data" and e.offset <= 6 * MiB and e.end >= 7 * MiB for e in d.extents())
    assert os.path.getsize(image.path) == want["size"]
    lay = layout(image.path)
    assert all(h[1] == uuid.UUID(int=0) for h in lay.headers), "LogGuid must be cleared after replay"
    assert lay.bat[6] & 7 == FULLY_PRESENT
    assert disk_bytes(image.path) == want["expected"]          # read-only open now works
    assert check_vhdx(image.path) == []
    res = run("qemu-img", "check", "-f", "vhdx", image.path, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("corrupt", ["checksum", "guid", "signature"])
def test_log_with_a_bad_entry_read_write(image, corrupt):
    stage_log_entry(image, corrupt=corrupt)
    before = sha(image.path)
    with pytest.raises(FormatError) as info:
        VhdxDisk.open(image.path, read_only=False)
    err = info.value
    assert type(err) is FormatError
    assert err.structure == "log" and err.offset == image.layout.log_offset
    assert f"log at offset {image.layout.log_offset} " in str(err)
    assert sha(image.path) == before, "a log that cannot be replayed must not lead to any write"


@pytest.mark.parametrize("corrupt", ["checksum", "guid", "signature"])
def test_log_with_a_bad_entry_read_only(image, corrupt):
    """The file is corrupt (§2.3.3: no valid sequence -> MUST fail to open); a read-only open should say so
    rather than advise a read-write open that can only fail."""
    stage_log_entry(image, corrupt=corrupt)
    expect_refused(image.path, FormatError, "log", image.layout.log_offset)


def test_log_replay_refused_when_file_shorter_than_flushed_offset(image):
    """§2.3.3: a file shorter than the head entry's FlushedFileOffset was truncated: refuse."""
    lay = image.layout
    end = lay.file_size
    blob = encode_entry([DataUpdate(lay.block_offset(0), b"\xab" * 4096)], sequence_number=1, log_guid=LOG_GUID,
                        tail=0, flushed_file_offset=end + 2 * MiB, last_file_offset=end + 2 * MiB)
    write_at(image.path, lay.log_offset, blob)
    for slot in (0, 1):
        patch_header(image.path, slot, log_guid=LOG_GUID)
    before = sha(image.path)
    with pytest.raises(FormatError) as info:
        VhdxDisk.open(image.path, read_only=False)
    assert info.value.structure == "log entry" and info.value.offset == lay.log_offset
    assert "truncated" in str(info.value)
    assert sha(image.path) == before, "a log that cannot be replayed must not lead to any write"


def test_log_extends_past_end_of_file(ours):
    for slot in (0, 1):
        patch_header(ours.path, slot, log_guid=LOG_GUID, log_offset=64 * MiB)
    before = sha(ours.path)
    with pytest.raises(FormatError) as info:
        VhdxDisk.open(ours.path, read_only=False)
    assert info.value.structure == "log" and info.value.offset == 64 * MiB
    assert sha(ours.path) == before


def test_pending_log_left_by_a_crash_replays_to_the_new_state(ours, tmp_path):
    """Engine-made pending logs: crash a write+flush at every I/O; whenever the result needs replay, a
    read-only open refuses without writing and a read-write open replays to the written data."""
    new = bytearray(ours.expected)
    new[6 * MiB + 100:6 * MiB + 9100] = b"\x66" * 9000

    def operation(d):
        d.write(6 * MiB + 100, b"\x66" * 9000)
        d.flush()

    replays = 0
    for k in range(1, 60):
        work = str(tmp_path / "work.vhdx")
        shutil.copy(ours.path, work)
        try:
            d = VhdxDisk.open(work, read_only=False, io_factory=crashing_io(k))
            try:
                operation(d)
                d.close()
            finally:
                d.io.close()
        except SimulatedCrash:
            pass
        else:
            break                                           # k is past the last I/O
        try:
            VhdxDisk.open(work, read_only=True).close()
            continue
        except LogReplayRequired:
            pass
        replays += 1
        before = sha(work)
        with pytest.raises(LogReplayRequired):
            VhdxDisk.open(work, read_only=True)
        assert sha(work) == before
        assert disk_bytes(work, read_only=False) == bytes(new), f"crash at I/O {k}"
        assert disk_bytes(work) == bytes(new)
    else:
        pytest.fail("the operation never finished within 60 I/Os")
    assert replays >= 1


def test_log_guid_set_with_an_empty_log(ours):
    """LogGuid nonzero but LogLength 0: there is no log to hold the entries; refuse cleanly."""
    for slot in (0, 1):
        patch_header(ours.path, slot, log_guid=LOG_GUID, log_length=0)
    before = sha(ours.path)
    for read_only in (True, False):
        with pytest.raises(FormatError) as info:
            VhdxDisk.open(ours.path, read_only=read_only)
        err = info.value
        assert err.structure in ("header", "log"), str(err)
        assert err.offset in (*HEADERS, ours.layout.log_offset) and f"offset {err.offset} " in str(err)
        assert sha(ours.path) == before


@pytest.mark.parametrize("what", ["data descriptor", "zero descriptor", "LastFileOffset"])
def test_log_entry_with_offsets_beyond_any_file(ours, what):
    """A well-formed entry (valid checksum) whose FileOffset or LastFileOffset is near 2^64: replay must
    fail as a ReplicatorError, not with an OverflowError from the operating-system call."""
    lay = ours.layout
    end = lay.file_size
    top = 0xFFFFFFFFFFF00000
    updates = {"data descriptor": [DataUpdate(top, b"\x01" * 4096)],
               "zero descriptor": [ZeroUpdate(top, 4096)],
               "LastFileOffset": [DataUpdate(lay.block_offset(0), b"\x01" * 4096)]}[what]
    blob = encode_entry(updates, sequence_number=1, log_guid=LOG_GUID, tail=0, flushed_file_offset=end,
                        last_file_offset=top if what == "LastFileOffset" else end)
    write_at(ours.path, lay.log_offset, blob)
    for slot in (0, 1):
        patch_header(ours.path, slot, log_guid=LOG_GUID)
    try:
        VhdxDisk.open(ours.path, read_only=False).close()
    except ReplicatorError:
        pass
    except Exception as e:              # noqa: BLE001 -- the point of the test
        pytest.fail(f"replay raised {type(e).__name__}: {e}")


@pytest.mark.parametrize("target", [0, HEADERS[0], HEADERS[1] + 4096, "log"])
def test_log_entry_aimed_at_the_file_identifier_headers_or_the_log(ours, target):
    """The log never updates the file identifier, the headers or itself; an entry that does is corrupt."""
    lay = ours.layout
    at = lay.log_offset + 64 * KiB if target == "log" else target
    blob = encode_entry([DataUpdate(at, b"\x01" * 4096)], sequence_number=1, log_guid=LOG_GUID, tail=0,
                        flushed_file_offset=lay.file_size, last_file_offset=lay.file_size)
    write_at(ours.path, lay.log_offset, blob)
    for slot in (0, 1):
        patch_header(ours.path, slot, log_guid=LOG_GUID)
    expect_refused(ours.path, FormatError, "log entry", lay.log_offset, str(at))


def test_sequence_number_at_the_end_of_its_range(ours):
    """A valid header whose SequenceNumber cannot be incremented: readable, but not writable."""
    lay = ours.layout
    current = max((0, 1), key=lambda s: lay.headers[s][0])
    patch_header(ours.path, current, sequence_number=(1 << 64) - 1)
    before = sha(ours.path)
    assert disk_bytes(ours.path) == ours.expected
    with pytest.raises(FormatError) as info:
        VhdxDisk.open(ours.path, read_only=False)
    assert info.value.offset == HEADERS[current] and f"offset {HEADERS[current]} " in str(info.value)
    assert "SequenceNumber" in str(info.value)
    assert sha(ours.path) == before

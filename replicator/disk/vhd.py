"""VHD (Microsoft Virtual Hard Disk Image Format v1.0): fixed disks read-write, dynamic disks read-only.

A fixed VHD is the raw disk followed by a 512-byte footer (the layout Azure page blobs use). A dynamic
VHD is: footer copy at 0, "cxsparse" header, BAT of 32-bit sector numbers, then blocks (sector bitmap
padded to 512 bytes + block data), and the footer again at the end. Differencing disks are refused.

Virtual size and qemu. The footer carries a CHS geometry and a Current Size. The VHD spec's geometry
algorithm rounds *down*, so CHS*512 is usually smaller than the disk. Hyper-V, Azure and VirtualBox
use Current Size; so do we. qemu (block/vpc.c, vpc_open(); behaviour checked on qemu-img 7.2) uses
CHS*512 unless
  - the footer's creator application is "win ", "qem2", "d2v ", "CTXS" or "tap\\0", or
  - the geometry is the maximum 65535/16/255, or
  - it is opened with the runtime option force_size_calc=current_size.
(`qemu-img create -f vpc -o force_size=on` writes creator "qem2" *and* the maximum geometry; without
force_size it writes "qemu" and rounds the disk up to a CHS-exact size, so its own files agree.)
We write our own creator id "rplc" and the spec geometry, so a plain `qemu-img info -f vpc x.vhd`
reports the smaller CHS size and `qemu-img convert` would truncate. Read our files in qemu with
`--image-opts driver=vpc,force_size_calc=current_size,file.filename=x.vhd`, or create them with
creator_app="win " when a tool that cannot pass options must see the exact size. Also: qemu only
opens a fixed VHD as vpc with an explicit format (its probe looks for the cookie at offset 0 and
guesses raw), and `qemu-img check` does not support vpc (exit 63). tests/disk pins all of this.
"""
from __future__ import annotations

import os
import struct
import sys
import time
import uuid
from array import array
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Iterator

from .. import __version__
from ..errors import FormatError, UnsupportedFeature, UsageError
from .base import BlockDevice, Extent, ExtentKind, pread_exact, pwrite_all
from .raw import create_file, discard_file, file_extents, io_errors, open_file, zero_range

COOKIE = b"conectix"
SPARSE_COOKIE = b"cxsparse"
FORMAT_VERSION = 0x00010000
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
NO_OFFSET = 0xFFFF_FFFF_FFFF_FFFF
UNALLOCATED = 0xFFFF_FFFF
SECTOR = 512
FOOTER_SIZE = 512
DYN_HEADER_SIZE = 1024
VHD_EPOCH = 946684800            # 2000-01-01 00:00:00 UTC, origin of VHD timestamps
CREATOR_APP = b"rplc"            # replicator's creator application id
CREATOR_OS = b"Wi2k"             # the spec only defines Windows/Mac codes; Wi2k is what everyone writes
MAX_CHS_SECTORS = 65535 * 16 * 255
MIB = 1 << 20

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
_DYN_HEADER = struct.Struct(">8sQQIIII16sII512s192s256s")
_FOOTER_CHECKSUM_AT = 64
_DYN_CHECKSUM_AT = 36
assert _FOOTER.size == FOOTER_SIZE and _DYN_HEADER.size == DYN_HEADER_SIZE


def vhd_checksum(raw: bytes, checksum_at: int) -> int:
    """One's complement of the byte sum, the checksum field itself counted as zero."""
    total = sum(raw) - sum(raw[checksum_at:checksum_at + 4])
    return ~total & 0xFFFF_FFFF


def chs_geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for a disk of `size` bytes, per the VHD spec appendix."""
    total = min(size // SECTOR, MAX_CHS_SECTORS)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_heads = total // spt
    else:
        spt = 17
        cyl_heads = total // spt
        heads = max((cyl_heads + 1023) // 1024, 4)
        if cyl_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_heads = total // spt
        if cyl_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_heads = total // spt
    return cyl_heads // heads, heads, spt


def vhd_timestamp(unix_seconds: float | None = None) -> int:
    """Seconds since 2000-01-01 UTC, clamped to the field's 32 bits."""
    t = int(time.time() if unix_seconds is None else unix_seconds) - VHD_EPOCH
    return min(max(t, 0), 0xFFFF_FFFF)


@dataclass(frozen=True)
class VhdFooter:
    """The hard disk footer, fields as the spec names them (sizes in bytes)."""

    features: int
    version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    checksum: int
    unique_id: bytes
    saved_state: int

    def pack(self) -> bytes:
        """Serialize with a freshly computed checksum."""
        raw = _FOOTER.pack(COOKIE, self.features, self.version, self.data_offset, self.timestamp,
                           self.creator_app, self.creator_version, self.creator_os,
                           self.original_size, self.current_size, self.cylinders, self.heads,
                           self.sectors_per_track, self.disk_type, 0, self.unique_id,
                           self.saved_state, bytes(427))
        at = _FOOTER_CHECKSUM_AT
        return raw[:at] + vhd_checksum(raw, at).to_bytes(4, "big") + raw[at + 4:]

    @property
    def unix_time(self) -> int:
        return self.timestamp + VHD_EPOCH


def new_footer(size: int, creator_app: bytes = CREATOR_APP) -> VhdFooter:
    """Footer for a new fixed disk: spec geometry, fresh unique id, current time."""
    major, minor = (int(x) for x in __version__.split(".")[:2])
    cyl, heads, spt = chs_geometry(size)
    footer = VhdFooter(
        features=0x2, version=FORMAT_VERSION, data_offset=NO_OFFSET, timestamp=vhd_timestamp(),
        creator_app=creator_app, creator_version=(major << 16) | minor, creator_os=CREATOR_OS,
        original_size=size, current_size=size, cylinders=cyl, heads=heads, sectors_per_track=spt,
        disk_type=FIXED, checksum=0, unique_id=uuid.uuid4().bytes, saved_state=0)
    at = _FOOTER_CHECKSUM_AT
    return replace(footer, checksum=int.from_bytes(footer.pack()[at:at + 4], "big"))


def parse_footer(raw: bytes, offset: int, path: str) -> VhdFooter:
    """Decode and validate a footer read at file `offset`; FormatError says what is wrong."""
    def bad(problem: str, cls=FormatError):
        return cls("VHD footer", offset, problem, path)

    if len(raw) < FOOTER_SIZE:
        raise bad(f"only {len(raw)} of {FOOTER_SIZE} bytes present (file truncated)")
    f = _FOOTER.unpack(raw[:FOOTER_SIZE])
    if f[0] != COOKIE:
        raise bad(f"cookie is {f[0]!r}, expected {COOKIE!r} (not a VHD, or truncated)")
    footer = VhdFooter(*f[1:-1])
    want = vhd_checksum(raw[:FOOTER_SIZE], _FOOTER_CHECKSUM_AT)
    if footer.checksum != want:
        raise bad(f"checksum is 0x{footer.checksum:08x}, computed 0x{want:08x}")
    if footer.version != FORMAT_VERSION:
        raise bad(f"file format version 0x{footer.version:08x} is not 0x{FORMAT_VERSION:08x}")
    if footer.disk_type == DIFFERENCING:
        raise bad("differencing disks (disk type 4) are not supported", UnsupportedFeature)
    if footer.disk_type not in (FIXED, DYNAMIC):
        raise bad(f"disk type {footer.disk_type} is not 2 (fixed) or 3 (dynamic)")
    if footer.current_size % SECTOR:
        raise bad(f"current size {footer.current_size} is not a multiple of {SECTOR}")
    if footer.disk_type == FIXED and footer.data_offset not in (NO_OFFSET, 0xFFFF_FFFF):
        raise bad(f"fixed disk has data offset 0x{footer.data_offset:x}, expected all ones")
    return footer


@dataclass(frozen=True)
class DynamicHeader:
    data_offset: int
    table_offset: int
    version: int
    max_table_entries: int
    block_size: int
    checksum: int


def parse_dynamic_header(raw: bytes, offset: int, path: str) -> DynamicHeader:
    """Decode and validate the "cxsparse" header read at file `offset`."""
    def bad(problem: str):
        return FormatError("VHD dynamic header", offset, problem, path)

    if len(raw) < DYN_HEADER_SIZE:
        raise bad(f"only {len(raw)} of {DYN_HEADER_SIZE} bytes present (file truncated)")
    h = _DYN_HEADER.unpack(raw[:DYN_HEADER_SIZE])
    if h[0] != SPARSE_COOKIE:
        raise bad(f"cookie is {h[0]!r}, expected {SPARSE_COOKIE!r}")
    header = DynamicHeader(*h[1:7])
    want = vhd_checksum(raw[:DYN_HEADER_SIZE], _DYN_CHECKSUM_AT)
    if header.checksum != want:
        raise bad(f"checksum is 0x{header.checksum:08x}, computed 0x{want:08x}")
    if header.version != FORMAT_VERSION:
        raise bad(f"header version 0x{header.version:08x} is not 0x{FORMAT_VERSION:08x}")
    bs = header.block_size
    if bs < SECTOR or bs & (bs - 1):
        raise bad(f"block size {bs} is not a power of two of at least {SECTOR}")
    return header


def _read_at(fd: int, path: str, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    with io_errors(path, f"read at offset {offset}"):
        got = pread_exact(fd, memoryview(buf), offset)
    return bytes(buf[:got])


def read_footer(fd: int, path: str, file_size: int) -> tuple[VhdFooter, int]:
    """The footer and where it was found: the end of the file, or for a dynamic disk whose end footer
    is damaged, the copy at offset 0 (the spec keeps that copy exactly for this)."""
    if file_size < FOOTER_SIZE:
        raise FormatError("VHD footer", 0, f"file is {file_size} bytes, too small for the "
                          f"{FOOTER_SIZE}-byte footer", path)
    end = file_size - FOOTER_SIZE
    try:
        return parse_footer(_read_at(fd, path, end, FOOTER_SIZE), end, path), end
    except UnsupportedFeature:
        raise
    except FormatError as end_error:
        head = _read_at(fd, path, 0, FOOTER_SIZE) if end > 0 else b""
        if head[:8] != COOKIE:
            raise
        try:
            copy = parse_footer(head, 0, path)
        except FormatError:
            raise end_error from None
        if copy.disk_type == FIXED:     # a fixed disk has no copy: this is data that looks like one
            raise end_error
        return copy, 0


class VhdDisk(BlockDevice):
    """Common part of fixed and dynamic VHDs: the open file and its footer."""

    format_name = "vhd"
    subformat = "?"

    def __init__(self, fd: int, path: str, footer: VhdFooter, footer_offset: int, file_size: int,
                 read_only: bool):
        self.fd = fd
        self.path = path
        self.footer = footer
        self.footer_offset = footer_offset      # 0 when the end footer was bad and the copy was used
        self.file_size = file_size
        self.size = footer.current_size
        self.read_only = read_only

    def _pread(self, buf: memoryview, file_offset: int, structure: str) -> None:
        with io_errors(self.path, f"read at offset {file_offset}"):
            got = pread_exact(self.fd, buf, file_offset)
        if got < len(buf):
            raise FormatError(structure, file_offset + got, "file ends early (truncated?)", self.path)

    def flush(self) -> None:
        if not self.read_only and self.fd >= 0:
            with io_errors(self.path, "fsync"):
                os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with io_errors(self.path, "close"):
                os.close(fd)


class FixedVhd(VhdDisk):
    """Virtual byte N is file byte N; the footer follows the data."""

    subformat = "fixed"

    def __init__(self, *args):
        super().__init__(*args)
        if self.size + FOOTER_SIZE > self.file_size:
            raise FormatError("VHD footer", self.footer_offset,
                              f"current size {self.size} needs a {self.size + FOOTER_SIZE}-byte "
                              f"file, but the file has {self.file_size} bytes", self.path)

    def _readinto(self, offset: int, buf: memoryview) -> None:
        self._pread(buf, offset, "VHD data")

    def _write(self, offset: int, data: memoryview) -> None:
        with io_errors(self.path, f"write at offset {offset}"):
            pwrite_all(self.fd, data, offset)

    def _write_zeroes(self, offset: int, length: int) -> None:
        with io_errors(self.path, f"zeroing {length} bytes at offset {offset}"):
            zero_range(self.fd, offset, length)

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        with io_errors(self.path, "mapping allocated ranges"):
            yield from file_extents(self.fd, offset, length)


class DynamicVhd(VhdDisk):
    """Sparse VHD, read-only: blocks located through the BAT, sectors filtered by the block bitmap."""

    subformat = "dynamic"
    _BITMAP_CACHE = 64

    def __init__(self, *args):
        super().__init__(*args)
        self.header_offset = self._header_offset()
        raw = _read_at(self.fd, self.path, self.header_offset, DYN_HEADER_SIZE)
        self.header = parse_dynamic_header(raw, self.header_offset, self.path)
        self.block_size = self.header.block_size
        sectors = self.block_size // SECTOR
        self.bitmap_size = -(-((sectors + 7) // 8) // SECTOR) * SECTOR
        self.bat = self._load_bat()
        self._check_blocks()
        self._bitmaps: OrderedDict[int, bytes] = OrderedDict()

    def _header_offset(self) -> int:
        off = self.footer.data_offset
        if off == NO_OFFSET or off < FOOTER_SIZE or off + DYN_HEADER_SIZE > self.file_size:
            raise FormatError("VHD footer", self.footer_offset,
                              f"data offset 0x{off:x} does not point at a dynamic disk header "
                              f"inside the {self.file_size}-byte file", self.path)
        return off

    def _load_bat(self) -> array:
        """The BAT entries the virtual size needs (later entries are never consulted)."""
        h, where = self.header, self.header_offset
        needed = -(-self.size // self.block_size)
        if h.max_table_entries < needed:
            raise FormatError("VHD dynamic header", where,
                              f"BAT has {h.max_table_entries} entries of {self.block_size} bytes, "
                              f"fewer than the {needed} the current size {self.size} needs", self.path)
        if h.table_offset + 4 * h.max_table_entries > self.file_size:
            raise FormatError("VHD dynamic header", where,
                              f"BAT at 0x{h.table_offset:x} with {h.max_table_entries} entries runs "
                              f"past the end of the {self.file_size}-byte file", self.path)
        bat = array("I", _read_at(self.fd, self.path, h.table_offset, 4 * needed))
        if sys.byteorder == "little":
            bat.byteswap()
        return bat

    def _check_blocks(self) -> None:
        """Every allocated block must lie inside the file, clear of the metadata and of each other."""
        limit = self.file_size - (FOOTER_SIZE if self.footer_offset else 0)
        span = self.bitmap_size + self.block_size
        meta = [("footer copy", 0, FOOTER_SIZE),
                ("dynamic header", self.header_offset, self.header_offset + DYN_HEADER_SIZE),
                ("BAT", self.header.table_offset,
                 self.header.table_offset + 4 * self.header.max_table_entries)]
        used = []
        for i, entry in enumerate(self.bat):
            if entry == UNALLOCATED:
                continue
            start = entry * SECTOR
            if start + span > limit:
                self._bad_entry(i, f"block at file offset {start} ends at {start + span}, past "
                                   f"the data area that ends at {limit}")
            for name, lo, hi in meta:
                if start < hi and lo < start + span:
                    self._bad_entry(i, f"block at file offset {start} overlaps the {name}")
            used.append((start, i))
        used.sort()
        for (prev, _), (start, i) in zip(used, used[1:]):
            if start < prev + span:
                self._bad_entry(i, f"block at file offset {start} overlaps the block at {prev}")

    def _bad_entry(self, index: int, problem: str):
        raise FormatError(f"VHD BAT entry {index}", self.header.table_offset + 4 * index, problem,
                          self.path)

    # ---- mapping ----
    def _blocks(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """Split a virtual range into (block index, offset in block, length) pieces."""
        end = offset + length
        while offset < end:
            blk, in_off = divmod(offset, self.block_size)
            n = min(self.block_size - in_off, end - offset)
            yield blk, in_off, n
            offset += n

    def _bitmap(self, blk: int) -> bytes:
        cached = self._bitmaps.get(blk)
        if cached is not None:
            self._bitmaps.move_to_end(blk)
            return cached
        buf = bytearray(self.bitmap_size)
        self._pread(memoryview(buf), self.bat[blk] * SECTOR, f"VHD block {blk} bitmap")
        self._bitmaps[blk] = bytes(buf)
        if len(self._bitmaps) > self._BITMAP_CACHE:
            self._bitmaps.popitem(last=False)
        return self._bitmaps[blk]

    def _runs(self, blk: int, in_off: int, n: int) -> Iterator[tuple[int, int, bool]]:
        """(offset in block, length, present) runs of one allocated block, from its sector bitmap
        (bit set = sector written; sector 0 is the most significant bit of byte 0)."""
        for s, count, present in bit_runs(self._bitmap(blk), in_off // SECTOR,
                                          (in_off + n - 1) // SECTOR):
            lo = max(s * SECTOR, in_off)
            hi = min((s + count) * SECTOR, in_off + n)
            yield lo, hi - lo, present

    def _readinto(self, offset: int, buf: memoryview) -> None:
        pos = 0
        for blk, in_off, n in self._blocks(offset, len(buf)):
            out = buf[pos:pos + n]
            pos += n
            if self.bat[blk] == UNALLOCATED:
                out[:] = bytes(n)
                continue
            data_at = self.bat[blk] * SECTOR + self.bitmap_size
            for lo, length, present in self._runs(blk, in_off, n):
                piece = out[lo - in_off:lo - in_off + length]
                if present:
                    self._pread(piece, data_at + lo, f"VHD block {blk}")
                else:
                    piece[:] = bytes(length)

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        for blk, in_off, n in self._blocks(offset, length):
            base = blk * self.block_size
            if self.bat[blk] == UNALLOCATED:
                yield Extent(base + in_off, n, ExtentKind.ZERO)
                continue
            for lo, run, present in self._runs(blk, in_off, n):
                yield Extent(base + lo, run, ExtentKind.DATA if present else ExtentKind.ZERO)


def bit_runs(bitmap: bytes, first: int, last: int) -> Iterator[tuple[int, int, bool]]:
    """Runs of equal bits over bits [first, last] of an MSB-first bitmap: (start, count, bit)."""
    chunk = bitmap[first >> 3:(last >> 3) + 1]
    if chunk.count(0xFF) == len(chunk) or not any(chunk):
        yield first, last - first + 1, bool(chunk[0])
        return
    start, cur = first, bool(bitmap[first >> 3] & (0x80 >> (first & 7)))
    for s in range(first + 1, last + 1):
        bit = bool(bitmap[s >> 3] & (0x80 >> (s & 7)))
        if bit != cur:
            yield start, s - start, cur
            start, cur = s, bit
    yield start, last + 1 - start, cur


def open_vhd(path, read_only: bool = True) -> VhdDisk:
    """Open a fixed (read-only or read-write) or dynamic (read-only) VHD."""
    path = str(path)
    fd = open_file(path, read_only)
    try:
        with io_errors(path, "finding the size"):
            file_size = os.lseek(fd, 0, os.SEEK_END)
        footer, at = read_footer(fd, path, file_size)
        if footer.disk_type == DYNAMIC and not read_only:
            raise UsageError(f"{path}: dynamic VHDs can only be opened read-only here; convert it "
                             f"to a fixed VHD (or raw) to write to it")
        cls = FixedVhd if footer.disk_type == FIXED else DynamicVhd
        return cls(fd, path, footer, at, file_size, read_only)
    except BaseException:
        os.close(fd)
        raise


def _check_create(path: str, size: int, subformat: str, azure: bool, creator_app: bytes) -> None:
    if subformat != "fixed":
        raise UsageError(f"{path}: can only create fixed VHDs (asked for subformat {subformat!r}); "
                         f"dynamic VHDs are read-only in replicator")
    if size <= 0 or size % SECTOR:
        raise UsageError(f"{path}: VHD size must be a positive multiple of {SECTOR} bytes, got {size}")
    if azure and size % MIB:
        up = -(-size // MIB) * MIB
        raise UsageError(f"{path}: Azure needs a VHD virtual size that is a whole number of MiB; "
                         f"{size} is not (next valid size: {up})")
    if len(creator_app) != 4:
        raise UsageError(f"creator application id must be 4 bytes, got {creator_app!r}")


def create_vhd(path, size: int, subformat: str = "fixed", *, azure: bool = False,
               overwrite: bool = False, creator_app: bytes | str = CREATOR_APP) -> VhdDisk:
    """Create a fixed VHD of `size` bytes (sparse, reading as zeros) and return it open read-write.

    azure=True refuses sizes that are not a multiple of 1 MiB (Azure rejects those VHDs on upload).
    """
    path = str(path)
    if isinstance(creator_app, str):
        creator_app = creator_app.encode("ascii")
    _check_create(path, size, subformat, azure, creator_app)
    footer = new_footer(size, creator_app)
    fd = create_file(path, overwrite)
    try:
        with io_errors(path, "writing the VHD footer"):
            os.ftruncate(fd, size)
            pwrite_all(fd, footer.pack(), size)
    except BaseException:
        discard_file(fd, path)
        raise
    return FixedVhd(fd, path, footer, size, size + FOOTER_SIZE, False)

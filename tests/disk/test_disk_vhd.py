"""VHD driver without qemu: creation, footer fields, dynamic reading, and bad input."""
from __future__ import annotations

import os
import struct
import time
import uuid

import pytest

from replicator.disk.base import Extent, ExtentKind
from replicator.disk.vhd import (VHD_EPOCH, bit_runs, chs_geometry, create_vhd, open_vhd,
                                 vhd_checksum)
from replicator.errors import (FormatError, OutOfRange, ReadOnlyError, UnsupportedFeature,
                               UsageError)

from .vhdtools import build_dynamic, footer_bytes, with_checksum

MIB = 1 << 20
DATA, ZERO = ExtentKind.DATA, ExtentKind.ZERO


def write(path, data) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_chs_geometry_follows_spec():
    assert chs_geometry(3 * MIB) == (90, 4, 17)
    assert chs_geometry(1 << 30) == (2080, 16, 63)
    assert chs_geometry(127 * (1 << 30)) == (65278, 16, 255)
    assert chs_geometry(4 << 40) == (65535, 16, 255)          # capped at the maximum
    for size in (512, 10 * MIB + 512, 300 * MIB, 50 << 30):
        c, h, s = chs_geometry(size)
        assert c * h * s * 512 <= size


def test_create_fixed_footer_fields(tmp_path):
    p = tmp_path / "f.vhd"
    before = time.time()
    with create_vhd(p, 5 * MIB) as d:
        assert (d.size, d.subformat, d.read_only) == (5 * MIB, "fixed", False)
    raw = open(p, "rb").read()
    assert len(raw) == 5 * MIB + 512 and os.stat(p).st_blocks <= 16   # sparse data region
    f = raw[-512:]
    assert f[:8] == b"conectix"
    assert struct.unpack(">I", f[64:68])[0] == vhd_checksum(f, 64)
    features, version, data_off, ts = struct.unpack(">IIQI", f[8:28])
    assert (features, version, data_off) == (2, 0x00010000, 0xFFFFFFFFFFFFFFFF)
    assert before - 2 <= ts + VHD_EPOCH <= time.time() + 2
    assert f[28:32] == b"rplc" and f[36:40] == b"Wi2k"
    assert struct.unpack(">QQHBBI", f[40:64]) == (5 * MIB, 5 * MIB, *chs_geometry(5 * MIB), 2)
    assert uuid.UUID(bytes=f[68:84]).version == 4 and f[84:] == bytes(428)
    other = create_vhd(tmp_path / "g.vhd", 5 * MIB)
    assert other.footer.unique_id != f[68:84]
    other.close()


def test_fixed_round_trip_and_extents(tmp_path):
    p = tmp_path / "f.vhd"
    with create_vhd(p, 8 * MIB, azure=True) as d:
        d.write(2 * MIB - 5, b"0123456789")
        d.write(7 * MIB, b"\x11" * MIB)
        d.flush()
    with open_vhd(p) as d:
        assert d.read_only and d.size == 8 * MIB
        assert d.read(2 * MIB - 6, 12) == b"\x000123456789\x00"
        ext = list(d.extents())
        assert [e.kind for e in ext] == [ZERO, DATA, ZERO, DATA]
        assert ext[-1] == Extent(7 * MIB, MIB, DATA)   # the footer is not part of the disk
        with pytest.raises(ReadOnlyError):
            d.write(0, b"x")
        with pytest.raises(OutOfRange):
            d.read(8 * MIB - 1, 2)
    with open_vhd(p, read_only=False) as d:
        d.write_zeroes(7 * MIB, MIB)
        assert [e.kind for e in d.extents()][-1] is ZERO
        assert d.read(7 * MIB, 16) == bytes(16)
    assert open_vhd(p).footer.current_size == 8 * MIB      # footer untouched by the writes


def test_create_refuses_bad_requests(tmp_path):
    with pytest.raises(UsageError, match="whole number of MiB.*next valid size: 2097152"):
        create_vhd(tmp_path / "a.vhd", MIB + 512, azure=True)
    with pytest.raises(UsageError, match="multiple of 512"):
        create_vhd(tmp_path / "b.vhd", 1000)
    with pytest.raises(UsageError, match="fixed"):
        create_vhd(tmp_path / "c.vhd", MIB, subformat="dynamic")
    with pytest.raises(UsageError, match="4 bytes"):
        create_vhd(tmp_path / "d.vhd", MIB, creator_app="toolong")
    assert not list(tmp_path.iterdir())
    create_vhd(tmp_path / "e.vhd", MIB).close()
    with pytest.raises(UsageError, match="already exists"):
        create_vhd(tmp_path / "e.vhd", MIB)
    create_vhd(tmp_path / "e.vhd", 2 * MIB, overwrite=True, creator_app="win ").close()
    assert open_vhd(tmp_path / "e.vhd").footer.creator_app == b"win "


def test_bit_runs_msb_first():
    assert list(bit_runs(b"\xff\xff", 0, 15)) == [(0, 16, True)]
    assert list(bit_runs(b"\x00", 2, 5)) == [(2, 4, False)]
    assert list(bit_runs(b"\xf0\x01", 0, 15)) == [(0, 4, True), (4, 11, False), (15, 1, True)]
    assert list(bit_runs(b"\x3c", 1, 6)) == [(1, 1, False), (2, 4, True), (6, 1, False)]


def test_dynamic_read_bitmap_and_extents(tmp_path):
    bs = 4096
    blk1 = bytes([1]) * bs
    # block 3: sectors 0-1 and 7 present (bits 0xc1); the others read as zeros whatever they hold
    blk3 = b"\x03" * 1024 + b"\xee" * (5 * 512) + b"\x07" * 512
    lay = build_dynamic(6 * bs + 1024, bs, {1: blk1, 3: (blk3, b"\xc1"), 6: b"\x09" * 1024})
    p = write(tmp_path / "d.vhd", lay.data)
    with open_vhd(p) as d:
        assert (d.subformat, d.size, d.block_size) == ("dynamic", 6 * bs + 1024, bs)
        want = bytearray(d.size)
        want[bs:2 * bs] = blk1
        want[3 * bs:3 * bs + 1024] = b"\x03" * 1024
        want[3 * bs + 3584:4 * bs] = b"\x07" * 512
        want[6 * bs:6 * bs + 1024] = b"\x09" * 1024
        assert d.read(0, d.size) == want
        for off, n in [(bs - 3, 10), (3 * bs + 1000, 3000), (6 * bs + 1, 1022)]:
            assert d.read(off, n) == want[off:off + n]
        assert list(d.extents()) == [
            Extent(0, bs, ZERO), Extent(bs, bs, DATA), Extent(2 * bs, bs, ZERO),
            Extent(3 * bs, 1024, DATA), Extent(3 * bs + 1024, 2560, ZERO),
            Extent(3 * bs + 3584, 512, DATA), Extent(4 * bs, 2 * bs, ZERO),
            Extent(6 * bs, 1024, DATA)]
        assert list(d.extents(3 * bs + 100, 200)) == [Extent(3 * bs + 100, 200, DATA)]
        with pytest.raises(ReadOnlyError):
            d.write(0, b"x")


def test_dynamic_read_write_refused(tmp_path):
    p = write(tmp_path / "d.vhd", build_dynamic(64 * 1024).data)
    with pytest.raises(UsageError, match="read-only"):
        open_vhd(p, read_only=False)


def test_dynamic_uses_footer_copy_when_end_footer_is_bad(tmp_path):
    lay = build_dynamic(64 * 1024, 4096, {2: b"\x42" * 4096})
    lay.data[-512:-504] = b"garbage!"
    with open_vhd(write(tmp_path / "d.vhd", lay.data)) as d:
        assert d.footer_offset == 0
        assert d.read(2 * 4096, 4096) == b"\x42" * 4096
    lay.data[:8] = b"garbage!"   # both bad: the end footer's problem is reported
    with pytest.raises(FormatError) as e:
        open_vhd(write(tmp_path / "e.vhd", lay.data))
    assert e.value.structure == "VHD footer" and e.value.offset == lay.footer_offset


# ---- bad input: every problem is a FormatError naming the structure and the offset ----
def expect_format_error(path, structure: str, offset: int, match: str):
    with pytest.raises(FormatError, match=match) as e:
        open_vhd(path)
    assert (e.value.structure, e.value.offset) == (structure, offset)
    assert structure in str(e.value) and f"offset {offset}" in str(e.value)
    return e.value


def fixed(tmp_path, size=MIB) -> str:
    p = tmp_path / "f.vhd"
    create_vhd(p, size, overwrite=True).close()
    return str(p)


def test_truncated_fixed(tmp_path):
    p = fixed(tmp_path)
    os.truncate(p, MIB + 100)
    expect_format_error(p, "VHD footer", MIB + 100 - 512, "cookie")
    os.truncate(p, 100)
    expect_format_error(p, "VHD footer", 0, "too small")


def test_fixed_footer_size_larger_than_file(tmp_path):
    p = write(tmp_path / "f.vhd", bytes(4096) + footer_bytes(8192, 2, 0xFFFFFFFFFFFFFFFF))
    expect_format_error(p, "VHD footer", 4096, "needs a 8704-byte file")


def test_wrong_cookie_and_checksum(tmp_path):
    p = fixed(tmp_path)
    patch(p, MIB, b"conectiy")
    expect_format_error(p, "VHD footer", MIB, "cookie")
    p = fixed(tmp_path)
    patch(p, MIB + 40, b"\x7f")
    expect_format_error(p, "VHD footer", MIB, "checksum")


@pytest.mark.parametrize("field_at, value, match", [
    (12, struct.pack(">I", 0x00020000), "version"),
    (60, struct.pack(">I", 7), "disk type 7"),
    (48, struct.pack(">Q", 1000), "multiple of 512"),
    (16, struct.pack(">Q", 0), "data offset"),
])
def test_bad_footer_fields(tmp_path, field_at, value, match):
    p = fixed(tmp_path)
    f = bytearray(open(p, "rb").read()[-512:])
    f[field_at:field_at + len(value)] = value
    patch(p, MIB, with_checksum(bytes(f), 64))
    expect_format_error(p, "VHD footer", MIB, match)


def test_differencing_is_unsupported(tmp_path):
    p = write(tmp_path / "x.vhd", bytes(4096) + footer_bytes(4096, 4, 512))
    e = expect_format_error(p, "VHD footer", 4096, "differencing")
    assert isinstance(e, UnsupportedFeature)


def dyn_file(tmp_path, lay) -> str:
    return write(tmp_path / "d.vhd", lay.data)


def set_header(lay, at: int, value: bytes) -> None:
    h = bytearray(lay.data[512:1536])
    h[at:at + len(value)] = value
    lay.data[512:1536] = with_checksum(bytes(h), 36)


def test_dynamic_header_problems(tmp_path):
    lay = build_dynamic(64 * 1024)
    lay.data[512:520] = b"cxsparsX"
    expect_format_error(dyn_file(tmp_path, lay), "VHD dynamic header", 512, "cookie")
    lay = build_dynamic(64 * 1024)
    lay.data[600] ^= 1
    expect_format_error(dyn_file(tmp_path, lay), "VHD dynamic header", 512, "checksum")
    for at, value, match in [(32, struct.pack(">I", 3000), "power of two"),
                             (28, struct.pack(">I", 3), "fewer than the 16"),
                             (16, struct.pack(">Q", 1 << 40), "past the end"),
                             (24, struct.pack(">I", 0x20000), "version")]:
        lay = build_dynamic(64 * 1024)
        set_header(lay, at, value)
        expect_format_error(dyn_file(tmp_path, lay), "VHD dynamic header", 512, match)


def test_footer_data_offset_outside_file(tmp_path):
    lay = build_dynamic(64 * 1024)
    f = bytearray(lay.data[-512:])
    f[16:24] = struct.pack(">Q", len(lay.data) + 512)
    lay.data[-512:] = with_checksum(bytes(f), 64)
    expect_format_error(dyn_file(tmp_path, lay), "VHD footer", lay.footer_offset, "data offset")


def test_bat_entry_outside_file(tmp_path):
    lay = build_dynamic(32 * 4096, 4096, {0: b"a", 17: b"b"})
    lay.data[1536 + 4 * 17:1536 + 4 * 18] = struct.pack(">I", len(lay.data) // 512)
    err = expect_format_error(dyn_file(tmp_path, lay), "VHD BAT entry 17", 1536 + 68, "past")
    assert "VHD BAT entry 17 at offset 1604" in str(err)


def test_bat_entry_overlaps(tmp_path):
    lay = build_dynamic(32 * 4096, 4096, {0: b"a", 5: b"b"})
    lay.data[1536 + 20:1536 + 24] = struct.pack(">I", 1)        # block on top of the header
    expect_format_error(dyn_file(tmp_path, lay), "VHD BAT entry 5", 1556, "dynamic header")
    lay = build_dynamic(32 * 4096, 4096, {0: b"a", 5: b"b"})
    lay.data[1536 + 20:1536 + 24] = lay.data[1536:1540]          # two blocks share space
    expect_format_error(dyn_file(tmp_path, lay), "VHD BAT entry 5", 1556, "overlaps the block")


def test_truncated_dynamic(tmp_path):
    lay = build_dynamic(32 * 4096, 4096, {0: b"a", 3: b"b"})
    p = write(tmp_path / "d.vhd", lay.data[:lay.block_offsets[3] + 1000])
    expect_format_error(p, "VHD BAT entry 3", 1536 + 12, "past")

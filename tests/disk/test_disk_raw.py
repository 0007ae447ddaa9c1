"""RawDisk: round trips, hole punching, SEEK_DATA/SEEK_HOLE extents, errors."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.disk import raw
from replicator.disk.base import Extent, ExtentKind
from replicator.disk.raw import create_raw, open_raw
from replicator.errors import DiskIOError, OutOfRange, ReadOnlyError, UsageError

MIB = 1 << 20
DATA, ZERO = ExtentKind.DATA, ExtentKind.ZERO


def check_cover(extents: list[Extent], offset: int, length: int) -> None:
    """Extents must tile the range in order, with neighbours of the same kind merged."""
    pos = offset
    for i, e in enumerate(extents):
        assert e.offset == pos and e.length > 0
        if i:
            assert extents[i - 1].kind != e.kind
        pos = e.end
    assert pos == offset + length


def data_ranges(extents):
    return [(e.offset, e.end) for e in extents if e.kind is DATA]


def test_create_is_sparse_and_reads_zeros(tmp_path):
    with create_raw(tmp_path / "d.raw", 8 * MIB) as d:
        assert d.size == 8 * MIB and not d.read_only
        assert d.read(0, 4096) == bytes(4096)
        assert list(d.extents()) == [Extent(0, 8 * MIB, ZERO)]
    assert os.stat(tmp_path / "d.raw").st_blocks == 0


def test_round_trip_and_reopen(tmp_path):
    p = tmp_path / "d.raw"
    with create_raw(p, 4 * MIB) as d:
        d.write(MIB + 3, b"hello world")
        d.flush()
    with open_raw(p) as d:
        assert d.read_only and d.size == 4 * MIB
        assert d.read(MIB, 16) == b"\0\0\0hello world\0\0"
        with pytest.raises(ReadOnlyError):
            d.write(0, b"x")
    with open_raw(p, read_only=False) as d:
        d.write(0, b"abc")
    assert open(p, "rb").read(3) == b"abc"


def test_extents_of_sparse_file(tmp_path):
    with create_raw(tmp_path / "d.raw", 16 * MIB) as d:
        d.write(MIB, b"\x01" * 8192)
        d.write(10 * MIB, b"\x02" * MIB)
        ext = list(d.extents())
        check_cover(ext, 0, d.size)
        assert data_ranges(ext) == [(MIB, MIB + 8192), (10 * MIB, 11 * MIB)]
        sub = list(d.extents(MIB + 4096, 10 * MIB))
        check_cover(sub, MIB + 4096, 10 * MIB)
        assert sub[0] == Extent(MIB + 4096, 4096, DATA)
        assert sub[-2:] == [Extent(10 * MIB, MIB, DATA), Extent(11 * MIB, 4096, ZERO)]


def test_write_zeroes_punches_hole(tmp_path):
    p = tmp_path / "d.raw"
    with create_raw(p, 4 * MIB) as d:
        d.write(0, b"\xaa" * (4 * MIB))
        before = os.stat(p).st_blocks
        d.write_zeroes(MIB, 2 * MIB)
        assert os.stat(p).st_blocks < before
        assert data_ranges(list(d.extents())) == [(0, MIB), (3 * MIB, 4 * MIB)]
        d.trim(100, 50)  # unaligned: partial block zeroed, neighbours kept
        got = d.read(0, 4096)
        assert got == b"\xaa" * 100 + bytes(50) + b"\xaa" * (4096 - 150)
        assert d.read(MIB - 1, 2 * MIB + 2) == b"\xaa" + bytes(2 * MIB) + b"\xaa"


def test_write_zeroes_fallback_without_fallocate(tmp_path, monkeypatch):
    monkeypatch.setattr(raw, "_fallocate", None)
    with create_raw(tmp_path / "d.raw", MIB) as d:
        d.write(0, b"\xff" * MIB)
        d.write_zeroes(1000, 70000)
        assert d.read(0, MIB) == b"\xff" * 1000 + bytes(70000) + b"\xff" * (MIB - 71000)


def test_errors(tmp_path):
    with pytest.raises(DiskIOError, match="missing.raw"):
        open_raw(tmp_path / "missing.raw")
    p = tmp_path / "d.raw"
    create_raw(p, 4096).close()
    with pytest.raises(UsageError, match="already exists"):
        create_raw(p, 4096)
    with create_raw(p, 8192, overwrite=True) as d:
        assert d.size == 8192
        with pytest.raises(OutOfRange):
            d.read(8000, 200)
        with pytest.raises(OutOfRange):
            d.write(-1, b"x")
        with pytest.raises(OutOfRange):
            list(d.extents(0, 8193))
    with pytest.raises(UsageError):
        create_raw(tmp_path / "neg.raw", -1)
    d.close()  # closing twice is harmless


ops = st.lists(st.tuples(st.sampled_from(["write", "zero"]), st.integers(0, 256 * 1024 - 1),
                         st.integers(1, 70000), st.integers(0, 255)), max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_random_ops_match_shadow(tmp_path, ops):
    size = 256 * 1024
    shadow = bytearray(size)
    with create_raw(tmp_path / "h.raw", size, overwrite=True) as d:
        for kind, off, n, byte in ops:
            n = min(n, size - off)
            if kind == "write":
                d.write(off, bytes([byte]) * n)
                shadow[off:off + n] = bytes([byte]) * n
            else:
                d.write_zeroes(off, n)
                shadow[off:off + n] = bytes(n)
        assert d.read(0, size) == shadow
        ext = list(d.extents())
        check_cover(ext, 0, size)
        for e in ext:
            if e.kind is ZERO:
                assert not any(shadow[e.offset:e.end])

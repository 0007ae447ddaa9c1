"""Fuzz: damaged VHDs (flipped bytes, rewritten fields with valid checksums, truncation) either open and
read, or fail with a ReplicatorError subclass; nothing else escapes and nothing hangs."""
from __future__ import annotations

import itertools
import signal
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.disk.vhd import create_vhd, open_vhd
from replicator.errors import ReplicatorError

from .vhdtools import QEMU_IMG, build_dynamic, qemu_io, run, with_checksum

MIB = 1 << 20
INTERESTING = [0, 1, 2, 3, 4, 511, 512, 513, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32,
               0xFFFFFFFFFFFFFFFF, 1 << 40, 1536, 4096, 1 << 21]


class Hang(Exception):
    """Not a ReplicatorError: a hang fails the test."""


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """name -> (bytes, regions worth aiming at, dynamic header offset or None)."""
    d = tmp_path_factory.mktemp("fuzzbase")
    out = {}
    with create_vhd(d / "fixed.vhd", 64 * 1024) as v:
        v.write(1000, b"\x77" * 5000)
    data = (d / "fixed.vhd").read_bytes()
    out["fixed"] = (data, [(len(data) - 512, len(data))], None)
    lay = build_dynamic(48 * 1024, 4096, {0: b"\x01" * 4096, 3: (b"\x02" * 4096, b"\x3c"),
                                          11: b"\x03" * 100})
    data = bytes(lay.data)
    out["dyn-small"] = (data, [(0, 512), (512, 1536), (1536, 2048), (2048, len(data) - 512),
                               (len(data) - 512, len(data))], 512)
    if QEMU_IMG:
        run(QEMU_IMG, "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", d / "q.vhd", "5M")
        qemu_io(d / "q.vhd", "write -P 0xab 1M 64k")
        data = (d / "q.vhd").read_bytes()
        out["dyn-qemu"] = (data, [(0, 512), (512, 1536), (1536, 2048), (2048, 2560),
                                  (len(data) - 512, len(data))], 512)
    return out


def fix_checksums(buf: bytearray, header_at: int | None) -> None:
    """Recompute the checksums a mutation broke, so the fuzzer gets past them to the fields."""
    for at in {0, len(buf) - 512}:
        if at >= 0 and len(buf) - at >= 512 and buf[at:at + 8] == b"conectix":
            buf[at:at + 512] = with_checksum(bytes(buf[at:at + 512]), 64)
    if header_at is not None and len(buf) >= header_at + 1024:
        buf[header_at:header_at + 1024] = with_checksum(bytes(buf[header_at:header_at + 1024]), 36)


def mutate(buf: bytearray, regions, header_at, ops, truncate_to, fix) -> bytearray:
    for kind, region, frac, value in ops:
        lo, hi = regions[region % len(regions)]
        if hi <= lo:
            continue
        pos = lo + int(frac * (hi - lo - 1))
        if kind == "flip":
            buf[pos] ^= (value % 255) + 1
        else:   # overwrite an aligned 4- or 8-byte field with an interesting value
            width = 8 if value & 1 else 4
            pos -= pos % 4
            v = INTERESTING[value % len(INTERESTING)] & ((1 << (8 * width)) - 1)
            if pos + width <= len(buf):
                buf[pos:pos + width] = v.to_bytes(width, "big")
    if fix:
        fix_checksums(buf, header_at)
    if truncate_to is not None:
        del buf[int(truncate_to * len(buf)):]
    return buf


def exercise(path) -> None:
    """What a copy loop would do: open, map extents, read the start and the end."""
    with open_vhd(path) as d:
        ext = list(itertools.islice(d.extents(), 50_000))
        pos = 0
        for e in ext:
            assert e.offset == pos and e.length > 0
            pos = e.end
        n = min(d.size, 4 * MIB)
        assert len(d.read(0, n)) == n
        tail = min(d.size, 64 * 1024)
        assert len(d.read(d.size - tail, tail)) == tail


def _on_alarm(signum, frame):
    raise Hang("open/read of a fuzzed VHD took more than 20 s")


ops = st.lists(st.tuples(st.sampled_from(["flip", "set"]), st.integers(0, 10),
                         st.floats(0, 1), st.integers(0, 1000)), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=st.sampled_from(["fixed", "dyn-small", "dyn-qemu"]), ops=ops,
       truncate_to=st.one_of(st.none(), st.floats(0, 1)), fix=st.booleans())
def test_fuzzed_vhd_fails_cleanly(tmp_path, images, name, ops, truncate_to, fix):
    if name not in images:
        pytest.skip("qemu-img not installed")
    data, regions, header_at = images[name]
    buf = mutate(bytearray(data), regions, header_at, ops, truncate_to, fix)
    p = tmp_path / "fuzz.vhd"
    p.write_bytes(buf)
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(20)
    try:
        exercise(p)
    except ReplicatorError:
        pass
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_unmutated_bases_open(images, tmp_path):
    for name, (data, _, _) in images.items():
        p = tmp_path / f"{name}.vhd"
        p.write_bytes(data)
        exercise(p)


def test_struct_sanity():
    assert struct.calcsize(">8sIIQI4sI4sQQHBBII16sB") == 85

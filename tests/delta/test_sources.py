"""Streams built from real inputs: an HRL log (coalesced, zero runs as ZERO frames), a whole VHDX applied
to an empty disk (checked with qemu-img compare), and a list of disk ranges."""
from __future__ import annotations

import io
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.delta import FrameKind, apply_stream, encode_disk, encode_extents, encode_log, verify_stream
from replicator.disk.raw import create_raw, open_raw
from replicator.hrl import HrlReader, HrlWriter
from replicator.vhdx import create_vhdx, open_vhdx

from ..externals import qemu_compare
from .helpers import KiB, MiB, MemDisk, content, decode_all, header, shadow

SIZE = 8 * MiB


def write_log(path, ops):
    w = HrlWriter(str(path))
    for op, offset, arg in ops:
        if op == "data":
            w.append(offset, arg)
        else:
            w.append_zeroes(offset, arg)
    w.seal()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), block=st.sampled_from((4 * KiB, 64 * KiB, 1 * MiB)))
def test_encode_log_round_trip(tmp_path_factory, seed, block):
    rng = random.Random(seed)
    ops = []
    for _ in range(rng.randrange(1, 40)):
        offset = rng.randrange(0, SIZE // 512) * 512
        length = min(rng.choice((512, 4 * KiB, 64 * KiB, 300 * KiB)), SIZE - offset)
        if rng.random() < 0.2:
            ops.append(("zero", offset, length))
        else:
            ops.append(("data", offset, content(rng.choice(("random", "text", "mixed")), length, rng.random())))
    path = tmp_path_factory.mktemp("hrl") / "a.hrl"
    write_log(path, ops)
    out = io.BytesIO()
    h = header(disk_size=SIZE, block_size=block)
    with HrlReader(str(path), disk_size=SIZE) as reader:
        stats = encode_log(reader, h, out)
    base = content("random", SIZE, seed)
    disk = MemDisk(SIZE, base)
    apply_stream(io.BytesIO(out.getvalue()), disk)
    assert bytes(disk.buf) == shadow(SIZE, ops, base)
    assert stats.stream_bytes == len(out.getvalue()) and stats.trailer is not None


def test_encode_log_sends_zero_writes_as_zero_frames(tmp_path):
    ops = [("data", 0, content("text", 100 * KiB, 1)), ("zero", 1 * MiB, 2 * MiB),
           ("data", 1 * MiB + 4 * KiB, content("random", 4 * KiB, 2))]
    write_log(tmp_path / "z.hrl", ops)
    out = io.BytesIO()
    with HrlReader(str(tmp_path / "z.hrl")) as reader:
        stats = encode_log(reader, header(disk_size=SIZE, block_size=1 * MiB), out)
    _, frames = decode_all(out.getvalue())
    assert [(f.kind, f.offset, f.length) for f in frames] == [
        (FrameKind.ZSTD, 0, 100 * KiB), (FrameKind.ZSTD, 1 * MiB, 8 * KiB),      # a short zero run stays data
        (FrameKind.ZERO, 1 * MiB + 8 * KiB, 2 * MiB - 8 * KiB)]
    assert stats.payload_bytes < 100 * KiB
    disk = MemDisk(SIZE, b"\7" * SIZE)
    apply_stream(io.BytesIO(out.getvalue()), disk)
    assert bytes(disk.buf) == shadow(SIZE, ops, b"\7" * SIZE)


def fill_vhdx(path, size):
    disk = create_vhdx(str(path), size, block_size=1 * MiB)
    rng = random.Random(3)
    for i in range(40):
        offset = rng.randrange(0, size // 4096) * 4096
        disk.write(offset, content(rng.choice(("random", "text", "mixed", "zeros")), rng.randrange(1, 200) * 512,
                                   i))
    disk.write(size - 3 * MiB, content("text", 3 * MiB, 99))
    disk.close()


def test_encode_disk_of_a_vhdx_reproduces_it(tmp_path):
    size = 64 * MiB
    src = tmp_path / "src.vhdx"
    fill_vhdx(src, size)
    out = io.BytesIO()
    with open_vhdx(str(src)) as disk:
        stats = encode_disk(disk, header(disk_size=size, kind="full"), out)
    assert stats.plain_bytes < 16 * MiB                                   # unallocated blocks were skipped
    assert verify_stream(io.BytesIO(out.getvalue()))[1].frames == sum(stats.frames.values())
    with create_raw(str(tmp_path / "dst.raw"), size) as dst:
        apply_stream(io.BytesIO(out.getvalue()), dst)
    assert qemu_compare(src, tmp_path / "dst.raw").returncode == 0
    with create_vhdx(str(tmp_path / "dst.vhdx"), size) as dst:
        apply_stream(io.BytesIO(out.getvalue()), dst)
    assert qemu_compare(src, tmp_path / "dst.vhdx", "vhdx", "vhdx").returncode == 0


def test_encode_disk_with_zero_extents_overwrites_a_dirty_target(tmp_path):
    size = 16 * MiB
    with create_raw(str(tmp_path / "src.raw"), size) as src:
        src.write(5 * MiB, content("text", 1 * MiB, 1))
    out = io.BytesIO()
    with open_raw(str(tmp_path / "src.raw")) as src:
        encode_disk(src, header(disk_size=size), out, zero_extents=True)
        expected = src.read(0, size)
    target = MemDisk(size, content("random", size, 5))
    apply_stream(io.BytesIO(out.getvalue()), target)
    assert bytes(target.buf) == expected


def test_encode_extents_sends_the_listed_ranges(tmp_path):
    size = 4 * MiB
    data = content("mixed", size, 8)
    src = MemDisk(size, data)
    ranges = [(0, 10), (1 * MiB, 200 * KiB), (3 * MiB + 7, 5000), (2 * MiB, 1 * MiB)]
    out = io.BytesIO()
    encode_extents(src, ranges, header(disk_size=size, kind="resync"), out)
    target = MemDisk(size)
    apply_stream(io.BytesIO(out.getvalue()), target)
    expected = bytearray(size)
    for off, n in ranges:
        expected[off:off + n] = data[off:off + n]
    assert bytes(target.buf) == bytes(expected)


def test_a_sink_may_keep_what_it_is_given():
    """encode_disk reuses its read buffer; a sink that queues the objects it gets must still see the right
    bytes, so the encoder hands out bytes, never views of the caller's buffer."""
    class Keeper:
        def __init__(self):
            self.parts = []

        def write(self, data):
            assert isinstance(data, bytes)
            self.parts.append(data)

    size = 4 * MiB
    data = content("random", size, 3)
    sink = Keeper()
    encode_disk(MemDisk(size, data), header(disk_size=size, block_size=64 * KiB), sink)
    target = MemDisk(size)
    apply_stream(io.BytesIO(b"".join(sink.parts)), target)
    assert bytes(target.buf) == data

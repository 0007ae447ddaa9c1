"""Round trips: whatever is encoded, applied to a disk, reproduces the shadow; encoding is deterministic;
frames respect the block size; compression adapts; API misuse raises ReplicatorError subclasses."""
from __future__ import annotations

import dataclasses
import io
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.delta import (DeltaDecoder, DeltaEncoder, FrameKind, StreamHeader, apply_stream, verify_stream)
from replicator.delta.encoder import zero_runs
from replicator.errors import OutOfRange, UsageError

from .helpers import KiB, MiB, MemDisk, content, decode_all, encode, header, shadow

SIZE = 1 * MiB
KINDS = ("random", "text", "zeros", "mixed")


@st.composite
def ops_strategy(draw):
    ops = []
    for _ in range(draw(st.integers(0, 12))):
        op = draw(st.sampled_from(("data", "data", "data", "zero", "trim")))
        offset = draw(st.integers(0, SIZE - 1))
        length = draw(st.integers(1, min(SIZE - offset, 300 * KiB)))
        if op == "data":
            ops.append((op, offset, content(draw(st.sampled_from(KINDS)), length, draw(st.integers(0, 99)))))
        else:
            ops.append((op, offset, length))
    return ops


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy(), block=st.sampled_from((512, 4 * KiB, 64 * KiB, 1 * MiB)),
       compress=st.booleans(), base_seed=st.integers(0, 3))
def test_round_trip_reproduces_the_shadow(ops, block, compress, base_seed):
    h = header(disk_size=SIZE, block_size=block)
    stream = encode(h, ops, compress=compress)
    base = content("mixed", SIZE, base_seed)
    disk = MemDisk(SIZE, base)
    stats = apply_stream(io.BytesIO(stream), disk)
    assert bytes(disk.buf) == shadow(SIZE, ops, base)
    assert stats.header == h and stats.trailer is not None
    dec, frames = decode_all(stream)
    for f in frames:
        assert f.length <= block or f.kind in (FrameKind.ZERO, FrameKind.TRIM)
        assert (f.data is None) == (f.kind in (FrameKind.ZERO, FrameKind.TRIM))
        assert compress or f.kind != FrameKind.ZSTD
    assert stream == encode(h, ops, compress=compress)          # deterministic


def test_empty_stream():
    h = header()
    stream = encode(h, [])
    dec, frames = decode_all(stream)
    assert frames == [] and dec.header == h and dec.trailer.frames == 0
    assert verify_stream(io.BytesIO(stream)) == (h, dec.trailer)


def test_header_round_trip_and_canonical_bytes():
    h = header(consistency="application", kind="resync", extra={"b": [1, 2.5, None], "a": {"x": "é"}},
               source_logs=[uuid.UUID(int=1), uuid.UUID(int=2)], created=1234.5678)
    dec, _ = decode_all(encode(h, []))
    assert dec.header == h
    assert h.pack() == dataclasses.replace(h).pack()
    assert encode(dataclasses.replace(h, created=1.0), []) != encode(h, [])


def test_frames_split_at_block_size_and_contiguous_adds_merge():
    h = header(disk_size=SIZE, block_size=16 * KiB)
    data = content("text", 100 * KiB, 5)
    ops = [("data", 4 * KiB + i, data[i:i + 1000]) for i in range(0, len(data), 1000)]
    _, frames = decode_all(encode(h, ops))
    assert [f.length for f in frames] == [16 * KiB] * 6 + [4 * KiB]
    assert b"".join(f.data for f in frames) == data


def test_compression_adapts():
    h = header(disk_size=SIZE, block_size=64 * KiB)
    ops = [("data", 0, content("random", 64 * KiB, 1)), ("data", 64 * KiB, content("text", 64 * KiB, 2)),
           ("data", 256 * KiB, bytes(64 * KiB)), ("data", 512 * KiB, bytes(100))]
    out = io.BytesIO()
    enc = DeltaEncoder(h, out)
    for _, off, data in ops:
        enc.add_data(off, data)
    enc.finish()
    _, frames = decode_all(out.getvalue())
    assert [f.kind for f in frames] == [FrameKind.RAW, FrameKind.ZSTD, FrameKind.ZERO, FrameKind.ZERO]
    assert enc.stats.payload_bytes < 64 * KiB + 64 * KiB // 2
    assert enc.stats.frames[FrameKind.ZERO] == 2 and enc.stats.zeroed_bytes == 64 * KiB + 100


def test_zero_runs_inside_data_become_zero_frames():
    h = header(disk_size=SIZE, block_size=1 * MiB)
    data = content("text", 10 * KiB, 1) + bytes(200 * KiB) + content("text", 10 * KiB, 2) + bytes(8 * KiB)
    disk = MemDisk(SIZE, content("random", SIZE, 9))
    apply_stream(io.BytesIO(encode(h, [("data", 1000, data)])), disk)
    assert bytes(disk.buf[1000:1000 + len(data)]) == data
    _, frames = decode_all(encode(h, [("data", 1000, data)]))
    assert [f.kind for f in frames] == [FrameKind.ZSTD, FrameKind.ZERO, FrameKind.ZSTD]
    assert zero_runs(memoryview(b"")) == []


def test_adjacent_zero_and_trim_runs_merge_and_order_is_kept():
    h = header(disk_size=SIZE)
    ops = [("zero", 0, 4096), ("zero", 4096, 4096), ("trim", 8192, 100), ("trim", 8292, 100),
           ("data", 0, b"x" * 10), ("zero", 5, 2)]
    _, frames = decode_all(encode(h, ops))
    assert [(f.kind, f.offset, f.length) for f in frames][:2] == [(FrameKind.ZERO, 0, 8192),
                                                                  (FrameKind.TRIM, 8192, 200)]
    disk = MemDisk(SIZE, b"\1" * SIZE)
    apply_stream(io.BytesIO(encode(h, ops)), disk)
    assert bytes(disk.buf) == shadow(SIZE, ops, b"\1" * SIZE)


def test_long_zero_runs_split_into_u32_frames():
    big = 5 << 30
    h = header(disk_size=big)
    _, frames = decode_all(encode(h, [("zero", 0, big)]))
    assert [f.length for f in frames] == [1 << 31, 1 << 31, 1 << 30]


def test_encoder_misuse():
    h = header(disk_size=SIZE)
    enc = DeltaEncoder(h, io.BytesIO())
    with pytest.raises(OutOfRange):
        enc.add_data(SIZE - 1, b"ab")
    with pytest.raises(OutOfRange):
        enc.add_zero(-1, 1)
    enc.finish()
    with pytest.raises(UsageError):
        enc.add_data(0, b"a")
    with pytest.raises(UsageError):
        DeltaEncoder(h, io.BytesIO(), level=22)


@pytest.mark.parametrize("bad", [dict(block_size=1000), dict(block_size=32 * MiB), dict(disk_size=-1),
                                 dict(consistency="x"), dict(kind="x"), dict(created=float("nan")),
                                 dict(source_logs=["a"]), dict(extra=[1]), dict(generation=True)])
def test_bad_headers_are_refused(bad):
    with pytest.raises(UsageError):
        header(**bad)


def test_unserialisable_extra_is_refused():
    with pytest.raises(UsageError):
        header(extra={"x": object()}).pack()


def test_decoder_limits_and_single_pass():
    stream = encode(header(block_size=1 * MiB), [("data", 0, b"abc")])
    with pytest.raises(Exception) as e:
        DeltaDecoder(io.BytesIO(stream), max_block=64 * KiB)
    assert "limit" in str(e.value)
    dec = DeltaDecoder(io.BytesIO(stream))
    list(dec)
    with pytest.raises(UsageError):
        iter(dec)


def test_apply_refuses_a_disk_of_another_size():
    stream = encode(header(disk_size=SIZE), [])
    with pytest.raises(UsageError):
        apply_stream(io.BytesIO(stream), MemDisk(SIZE * 2))


def test_levels_and_uncompressed_round_trip():
    h = header(disk_size=SIZE)
    ops = [("data", 0, content("mixed", 300 * KiB, 4))]
    for kw in (dict(level=-5), dict(level=19), dict(compress=False)):
        disk = MemDisk(SIZE)
        apply_stream(io.BytesIO(encode(h, ops, **kw)), disk)
        assert bytes(disk.buf) == shadow(SIZE, ops)


def test_stream_header_defaults():
    h = StreamHeader(uuid.UUID(int=5), 1 << 30)
    assert (h.block_size, h.kind, h.consistency, h.source_logs, h.extra) == (1 * MiB, "delta", "crash", [], {})

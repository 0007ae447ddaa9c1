"""zstd lanes: ZSTD frames take turns in k independent zstd streams compressed on k threads. The bytes
stay a pure function of the input, every lane count decodes to the same data, and a reader that assigns
frames to the wrong lanes cannot decode the stream."""
from __future__ import annotations

import io
import random
import uuid

import pytest

from replicator import delta
from replicator.delta.format import DeltaFormatError
from replicator.errors import UsageError

from .helpers import records

MiB = 1 << 20
SIZE = 64 * MiB


def changes(seed: int):
    rng = random.Random(seed)
    words = [rng.randbytes(8) for _ in range(64)]
    out = []
    for _ in range(40):
        n = rng.randrange(1, 3 * MiB)
        off = rng.randrange(0, SIZE - n)
        kind = rng.random()
        if kind < 0.15:
            out.append((off, n, None))
        elif kind < 0.3:
            out.append((off, n, rng.randbytes(n)))                         # travels RAW
        else:
            out.append((off, n, b"".join(rng.choices(words, k=n // 8 + 1))[:n]))   # compressible
    return out


def encode(lanes: int, seed: int = 1) -> bytes:
    header = delta.StreamHeader(uuid.UUID(int=7), SIZE, block_size=MiB, generation=1, zstd_lanes=lanes)
    sink = io.BytesIO()
    with delta.DeltaEncoder(header, sink) as enc:
        for off, n, data in changes(seed):
            if data is None:
                enc.add_zero(off, n)
            else:
                enc.add_data(off, data)
        enc.finish()
    return sink.getvalue()


def decoded(stream: bytes):
    dec = delta.DeltaDecoder(io.BytesIO(stream))
    return [(f.offset, f.length, f.kind, bytes(f.data) if f.data is not None else None) for f in dec]


@pytest.mark.parametrize("seed", [1, 2])
def test_every_lane_count_carries_the_same_frames(seed):
    one = decoded(encode(1, seed))
    kinds = {k for _, _, k, _ in one}
    assert delta.FrameKind.ZSTD in kinds and delta.FrameKind.RAW in kinds
    for lanes in (2, 3, 16):
        assert decoded(encode(lanes, seed)) == one


def test_lanes_are_deterministic_and_only_lane_streams_name_them():
    assert delta.StreamHeader(uuid.UUID(int=7), SIZE).zstd_lanes == 1        # one lane unless asked
    assert encode(3) == encode(3)
    assert b"zstd_lanes" not in encode(1)[:400] and b'"zstd_lanes":3' in encode(3)[:400]


def test_a_reader_that_uses_one_lane_for_a_two_lane_stream_fails():
    stream = encode(2)
    header = delta.DeltaDecoder(io.BytesIO(stream)).header
    one = delta.StreamHeader(**{**header.__dict__, "zstd_lanes": 1}).pack()
    two = header.pack()
    forged = one + stream[len(two):]
    with pytest.raises(DeltaFormatError, match="delta frame"):    # at a frame, before the trailer's digest
        decoded(forged)


@pytest.mark.parametrize("lanes", [0, 17, True, 1.5])
def test_lane_counts_outside_the_range_are_refused(lanes):
    with pytest.raises(UsageError, match="zstd_lanes"):
        delta.StreamHeader(uuid.UUID(int=7), SIZE, zstd_lanes=lanes)


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_long_frames_carry_whole_zstd_frames_between_small_ones(lanes):
    """Frames of WHOLE_FROM bytes or more end the lane's open zstd frame and hold one of their own (its
    magic right after the few closing bytes); small frames before and after still share a zstd frame, and
    every lane count decodes to the same bytes."""
    from replicator.delta.encoder import WHOLE_FROM
    rng = random.Random(lanes)
    words = [rng.randbytes(8) for _ in range(64)]
    ops, off = [], 0
    for i in range(24):
        n = [4096, 64 << 10, WHOLE_FROM, MiB, 8192][i % 5]
        ops.append((off, b"".join(rng.choices(words, k=n // 8))))
        off += n + 4096                             # not contiguous: every call is its own frame
    header = delta.StreamHeader(uuid.UUID(int=9), SIZE, block_size=MiB, generation=1, zstd_lanes=lanes)
    sink = io.BytesIO()
    with delta.DeltaEncoder(header, sink) as enc:
        for o, data in ops:
            enc.add_data(o, data)
        enc.finish()
    stream = sink.getvalue()
    got = [(f.offset, bytes(f.data)) for f in delta.DeltaDecoder(io.BytesIO(stream))]
    assert got == ops
    magic = b"\x28\xb5\x2f\xfd"
    payloads = [stream[start:start + size] for what, start, size in records(stream) if what == "payload"]
    assert len(payloads) == len(ops)
    whole = small = 0
    for (_, data), payload in zip(ops, payloads):
        if len(data) >= WHOLE_FROM:
            whole += 1
            assert magic in payload[:8], "a long frame holds a zstd frame of its own"
        elif magic not in payload[:8]:
            small += 1                              # continues its lane's open zstd frame
    assert whole == 10 and small > 0

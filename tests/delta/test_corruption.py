"""Damage: every byte flip and every truncation of a small stream is detected (at the damaged frame or at
the trailer, never as wrong data), fields changed behind a recomputed CRC hit the semantic checks, and a
ZSTD "zip bomb" fails without a large allocation."""
from __future__ import annotations

import io
import json
import re
import struct

import pytest

from replicator.delta import DeltaDecoder, DeltaFormatError, UnsupportedDeltaVersion, apply_stream, verify_stream
from replicator.delta.format import FRAME, PREFIX, FrameKind, pack_frame

from .helpers import KiB, MiB, MemDisk, decode_all, header, records, refix, run_with_bounded_memory, small_stream

H, OPS, STREAM = small_stream()
_, GOOD = decode_all(STREAM)


def decode_checked(stream: bytes) -> DeltaFormatError:
    """Decode a damaged stream: each frame it yields must be the original frame; it must end in an error."""
    got = []
    with pytest.raises(DeltaFormatError) as e:
        for f in DeltaDecoder(io.BytesIO(stream)):
            got.append(f)
    assert got == GOOD[:len(got)], "a damaged stream yielded a frame that differs from the original"
    return e.value


def test_the_small_stream_has_every_record_kind():
    kinds = {f.kind for f in GOOD}
    assert kinds == set(FrameKind) and sum(f.kind == FrameKind.ZSTD for f in GOOD) >= 3
    assert len(STREAM) < 4 * KiB


@pytest.mark.parametrize("mask", [1 << b for b in range(8)] + [0xFF])
def test_every_byte_flip_is_detected(mask):
    for pos in range(len(STREAM)):
        bad = bytearray(STREAM)
        bad[pos] ^= mask
        err = decode_checked(bytes(bad))
        assert err.structure.startswith("delta ") and err.offset is not None, (pos, err)


def test_every_truncation_and_any_extension_is_detected():
    for n in range(len(STREAM)):
        err = decode_checked(STREAM[:n])
        assert "truncated" in err.problem, (n, err)
    with pytest.raises(DeltaFormatError, match="after the trailer"):
        verify_stream(io.BytesIO(STREAM + b"\0"))


def test_errors_name_the_structure_and_offset():
    recs = records(STREAM)
    second_frame = [r for r in recs if r[0] == "frame"][1]
    bad = bytearray(STREAM)
    bad[second_frame[1] + 10] ^= 1
    err = decode_checked(bytes(bad))
    assert err.structure == "delta frame 2" and err.offset == second_frame[1]
    assert f"delta frame 2 at offset {second_frame[1]}" in str(err)


def test_an_applied_prefix_is_correct_when_the_tail_is_bad():
    disk = MemDisk(H.disk_size)
    with pytest.raises(DeltaFormatError):
        apply_stream(io.BytesIO(STREAM[:-1]), disk)
    for f in GOOD:
        if f.data is not None:
            assert bytes(disk.buf[f.offset:f.offset + f.length]) == f.data


# ---- damage behind a recomputed CRC reaches the semantic checks
def mutate_frame(index: int, **fields) -> bytes:
    frames = [r for r in records(STREAM) if r[0] == "frame"]
    _, start, size = frames[index]
    raw = bytearray(STREAM[start:start + size])
    tag, kind, reserved, offset, length, plen, digest, crc = FRAME.unpack(bytes(raw))
    vals = dict(tag=tag, kind=kind, reserved=reserved, offset=offset, length=length, plen=plen, digest=digest)
    vals.update(fields)
    raw[:] = FRAME.pack(*vals.values(), 0)
    return refix(STREAM[:start] + bytes(raw) + STREAM[start + size:], start, size)


@pytest.mark.parametrize("index,fields,problem", [
    (0, dict(kind=9), "unknown frame kind"),
    (0, dict(kind=0), "unknown frame kind"),
    (0, dict(reserved=b"\0\0\1"), "reserved"),
    (0, dict(tag=b"DFRX"), "unknown record tag"),
    (0, dict(offset=1 * MiB - 10), "beyond the disk size"),
    (0, dict(offset=1 << 63), "beyond the disk size"),
    (0, dict(length=0), "empty"),
    (0, dict(digest=b"\1" * 16), "XXH3-128"),
    (0, dict(plen=699), "payload length"),
    (1, dict(length=5000), "exceed the block size"),
    (1, dict(plen=0), "payload length"),
    (1, dict(plen=10 ** 6), "payload length"),
    (1, dict(length=4095), "expands beyond"),
    (1, dict(kind=FrameKind.RAW), "payload length|XXH3"),
    (1, dict(kind=FrameKind.ZERO), "ZERO frame with a payload"),
    (-2, dict(plen=5), "ZERO frame with a payload|TRIM frame with a payload"),
    (-2, dict(digest=b"\1" * 16), "with a payload, a digest"),
])
def test_semantic_checks(index, fields, problem):
    err = decode_checked(mutate_frame(index, **fields))
    assert err.structure.startswith("delta frame")
    assert re.search(problem, err.problem), err


def test_a_zstd_frame_that_needs_an_earlier_frame_fails_alone():
    zstd = [i for i, f in enumerate(GOOD) if f.kind == FrameKind.ZSTD]
    # drop the first ZSTD frame (header and payload): the next payload has no zstd frame header before it
    recs = records(STREAM)
    frames = [r for r in recs if r[0] == "frame"]
    start = frames[zstd[0]][1]
    end = frames[zstd[0] + 1][1]
    with pytest.raises(DeltaFormatError):
        verify_stream(io.BytesIO(STREAM[:start] + STREAM[end:]))


def test_trailer_counts_and_digest_are_checked():
    _, start, size = records(STREAM)[-1]
    for field_at in range(8, size - 4, 8):
        bad = bytearray(STREAM)
        bad[start + field_at] ^= 1
        err = decode_checked(refix(bytes(bad), start, size))
        assert err.structure == "delta trailer"
    bad = bytearray(STREAM)
    bad[start + 5] = 1
    assert "reserved" in str(decode_checked(refix(bytes(bad), start, size)))


def with_header_body(body: bytes, version: int = 1) -> bytes:
    raw = PREFIX.pack(b"RPLDELTA", version, 0, len(body)) + body + b"\0\0\0\0"
    return refix(raw, 0, len(raw))


@pytest.mark.parametrize("change", [
    lambda b: {**b, "block_size": 1000}, lambda b: {**b, "disk_id": "nope"}, lambda b: {**b, "disk_id": 5},
    lambda b: {**b, "source_logs": "x"}, lambda b: {**b, "extra": []}, lambda b: {**b, "surprise": 1},
    lambda b: {k: v for k, v in b.items() if k != "kind"}, lambda b: [1], lambda b: {**b, "created": "now"},
    lambda b: {**b, "disk_size": 1.5}, lambda b: {**b, "consistency": None}])
def test_header_fields_are_validated(change):
    body = json.dumps(change(H.body())).encode()
    with pytest.raises(DeltaFormatError, match="delta header"):
        DeltaDecoder(io.BytesIO(with_header_body(body)))


@pytest.mark.parametrize("body", [b"\xff\xfe", b"[" * 50000 + b"]" * 50000, b"{\"a\": 1e999999}",
                                  b"{\"disk_size\": " + b"9" * 5000 + b"}"])
def test_hostile_header_bodies(body):
    with pytest.raises(DeltaFormatError):
        DeltaDecoder(io.BytesIO(with_header_body(body)))


def test_header_envelope_checks():
    good = H.pack()
    with pytest.raises(UnsupportedDeltaVersion):
        DeltaDecoder(io.BytesIO(with_header_body(b"{}", version=2)))
    with pytest.raises(DeltaFormatError, match="flags"):
        raw = bytearray(good)
        raw[10] = 1
        DeltaDecoder(io.BytesIO(refix(bytes(raw), 0, len(raw))))
    with pytest.raises(DeltaFormatError, match="body length"):
        DeltaDecoder(io.BytesIO(PREFIX.pack(b"RPLDELTA", 1, 0, 1 << 30)))
    with pytest.raises(DeltaFormatError, match="magic"):
        DeltaDecoder(io.BytesIO(b"RPLDELTB" + good[8:]))


# ---- zip bomb
def rle_bomb(blocks: int) -> bytes:
    """A zstd frame of `blocks` RLE blocks of 128 KiB each: 4 bytes of payload per 128 KiB of output."""
    head = struct.pack("<IBB", 0xFD2FB528, 0x00, 0x38)          # no content size, 128 KiB window
    block = lambda last: (((128 * KiB) << 3) | (1 << 1) | last).to_bytes(3, "little") + b"\0"
    return head + block(0) * (blocks - 1) + block(1)


def bomb_stream() -> bytes:
    h = header(disk_size=64 * MiB, block_size=1 * MiB)
    payload = rle_bomb((1 * MiB) // 4)             # ~1 MiB of payload expanding to 32 GiB
    body = h.pack() + pack_frame(FrameKind.ZSTD, 0, 1 * MiB, len(payload), b"\0" * 16) + payload
    return body + b"\0" * 84


def test_zip_bomb_is_an_error_without_a_large_allocation(tmp_path):
    path = tmp_path / "bomb.delta"
    path.write_bytes(bomb_stream())
    r = run_with_bounded_memory(f"""
import sys
from replicator.delta import verify_stream, DeltaFormatError
try:
    verify_stream(open({str(path)!r}, 'rb'))
except DeltaFormatError as e:
    print(e); sys.exit(0)
sys.exit(3)
""")
    assert r.returncode == 0, r.stderr
    assert "expands beyond the declared 1048576 bytes" in r.stdout


def test_a_small_bomb_inside_a_valid_looking_stream():
    h = header(disk_size=1 * MiB, block_size=64 * KiB)
    payload = rle_bomb(3)
    stream = h.pack() + pack_frame(FrameKind.ZSTD, 0, 64 * KiB, len(payload), b"\0" * 16) + payload
    err = decode_checked_any(stream)
    assert "expands beyond" in str(err)


def decode_checked_any(stream: bytes) -> DeltaFormatError:
    with pytest.raises(DeltaFormatError) as e:
        verify_stream(io.BytesIO(stream))
    return e.value


def test_a_huge_window_is_refused():
    h = header(disk_size=1 * MiB, block_size=64 * KiB)
    payload = struct.pack("<IBB", 0xFD2FB528, 0x00, 0xF8) + (((64 * KiB) << 3) | 3).to_bytes(3, "little") + b"\0"
    stream = h.pack() + pack_frame(FrameKind.ZSTD, 0, 64 * KiB, len(payload), b"\0" * 16) + payload
    assert "does not decompress" in str(decode_checked_any(stream))

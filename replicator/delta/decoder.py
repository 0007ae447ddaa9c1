"""Decoding a delta stream: every frame is verified before it is yielded, the trailer after the last one.

A frame reaches the caller only after its header CRC, its bounds, its decompressed size and the XXH3-128
of its plain data all check out, so applying frames as they come can never write wrong bytes. What it can
do is stop halfway: a stream that later turns out truncated or corrupt raises at that point. Callers that
must be all-or-nothing verify the whole stream first (`verify_stream`) and apply in a second pass.

Memory stays bounded by the block size: a frame's payload (at most a little over block_size), its plain
data (at most block_size, never more even for a hostile "zip bomb" payload) and the zstd window (capped).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import zstandard

from .. import kernels
from ..errors import UsageError
from .format import (FRAME, FRAME_TAG, MAX_BLOCK, MAX_WINDOW, TAG_SIZE, TRAILER, TRAILER_TAG, DeltaFormatError,
                     FrameHeader, FrameKind, StreamHeader, Trailer, parse_frame, parse_trailer, read_header)


@dataclass(frozen=True)
class Frame:
    offset: int
    length: int
    kind: FrameKind
    data: bytes | None       # verified plain bytes for RAW and ZSTD; None for ZERO and TRIM (and inflate=False)
    payload: bytes | None = None    # inflate=False only: RAW and ZSTD payloads, not yet verified
    digest: bytes | None = None     # inflate=False only: the XXH3-128 the plain bytes must have
    lane: int = -1                  # ZSTD: the lane whose zstd stream the payload continues
    position: int = 0               # where the payload starts in the stream


class _Overflow(Exception):
    """A ZSTD payload produced more than its frame declared."""


class _BoundedSink:
    """Receives decompressed chunks and refuses to hold more than the current frame's length."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.limit = 0

    def reset(self, limit: int) -> None:
        self.buf = bytearray()
        self.limit = limit

    def write(self, chunk) -> int:
        if len(self.buf) + len(chunk) > self.limit:
            raise _Overflow()
        self.buf += chunk
        return len(chunk)


class _Inflater:
    """The decoding side of the stream's one zstd stream: each ZSTD payload yields exactly its frame."""

    def __init__(self, block_size: int):
        self._sink = _BoundedSink()
        dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        # write_size >= any frame's length: a valid payload's output never waits inside zstd for more input
        self._writer = dctx.stream_writer(self._sink, write_size=block_size)

    def inflate(self, payload: bytes, length: int) -> bytes | str:
        """The plain bytes, or a string saying what was wrong."""
        self._sink.reset(length)
        try:
            self._writer.write(payload)
        except _Overflow:
            return f"ZSTD payload expands beyond the declared {length} bytes"
        except zstandard.ZstdError as e:
            return f"ZSTD payload does not decompress: {e}"
        if len(self._sink.buf) != length:
            return f"ZSTD payload gives {len(self._sink.buf)} bytes, not the declared {length}"
        return self._sink.buf           # a new bytearray per frame (reset): no copy needed


class DeltaDecoder:
    """Reads a stream from `source` (.read(n), short only at EOF). The header is parsed at once; iterate
    for verified frames; after the last one `trailer` holds the verified trailer.

    inflate=False hands RAW and ZSTD frames over with their payload and digest instead of their plain
    bytes: everything else (headers, bounds, counts, the stream's digest) is still checked here, and the
    caller must decompress and verify each payload itself (delta.apply's native path)."""

    def __init__(self, source, *, max_block: int = MAX_BLOCK, path: str | None = None, inflate: bool = True):
        self.source = source
        self.path = path
        self.inflate = inflate
        self.position = 0
        self._hasher = kernels.Xxh3Hasher()
        self.header, raw = read_header(self._read_hashed, path)
        if self.header.block_size > max_block:
            raise DeltaFormatError("delta header", len(raw) - 4, f"block size {self.header.block_size} "
                                   f"exceeds this reader's limit {max_block}", path)
        self.trailer: Trailer | None = None
        self._counts = [0, 0, 0, 0, 0, 0, 0]   # per kind (RAW, ZSTD, ZERO, TRIM), plain, zeroed, payload
        self._inflaters: list[_Inflater | None] = [None] * self.header.zstd_lanes
        self._zstd_frames = 0
        self._started = False

    def __iter__(self) -> Iterator[Frame]:
        if self._started:
            raise UsageError("a delta stream can be iterated once")
        self._started = True
        return self._frames()

    # ---- reading
    def _read(self, n: int) -> bytes:
        data = self.source.read(n) if n else b""
        if data is None or len(data) > n:
            raise UsageError("delta decoder: the source's read() broke its contract")
        self.position += len(data)
        return data

    def _read_hashed(self, n: int) -> bytes:
        data = self._read(n)
        self._hasher.update(data)
        return data

    def _exact(self, n: int, where: str, what: str) -> bytes:
        pos = self.position
        data = self._read_hashed(n)
        if len(data) < n:
            raise DeltaFormatError(where, pos, f"truncated: {len(data)} of {n} bytes of {what}", self.path)
        return data

    # ---- records
    def _frames(self) -> Iterator[Frame]:
        index = 0
        while True:
            index += 1
            pos = self.position
            tag = self._read(TAG_SIZE)
            if tag == TRAILER_TAG:
                self._finish(tag, pos, self._hasher.digest())
                return
            self._hasher.update(tag)
            where = f"delta frame {index}"
            if len(tag) < TAG_SIZE:
                raise DeltaFormatError(where, pos, "truncated: the stream ends without a trailer", self.path)
            if tag != FRAME_TAG:
                raise DeltaFormatError(where, pos, f"unknown record tag {tag!r}", self.path)
            raw = tag + self._exact(FRAME.size - TAG_SIZE, where, "the frame header")
            fh = parse_frame(raw, self.header, where, pos, self.path)
            yield self._frame(fh, where)

    def _frame(self, fh: FrameHeader, where: str) -> Frame:
        pos = self.position
        payload = self._exact(fh.payload_length, where, "the payload") if fh.payload_length else b""
        data, lane = None, -1
        if fh.kind == FrameKind.ZSTD:              # ZSTD frames take turns in the stream's lanes
            lane = self._zstd_frames % len(self._inflaters)
            self._zstd_frames += 1
        self._count(fh)
        if not self.inflate:
            plain = fh.kind in (FrameKind.RAW, FrameKind.ZSTD)
            return Frame(fh.offset, fh.length, fh.kind, None, payload if plain else None,
                         fh.digest if plain else None, lane, pos)
        if fh.kind == FrameKind.RAW:
            data = payload
        elif fh.kind == FrameKind.ZSTD:
            if self._inflaters[lane] is None:
                self._inflaters[lane] = _Inflater(self.header.block_size)
            data = self._inflaters[lane].inflate(payload, fh.length)
            if isinstance(data, str):
                raise DeltaFormatError(where, pos, data, self.path)
        if data is not None and kernels.xxh3_128(data) != fh.digest:
            raise DeltaFormatError(where, pos, "XXH3-128 of the plain data does not match", self.path)
        return Frame(fh.offset, fh.length, fh.kind, data, lane=lane, position=pos)

    def _count(self, fh: FrameHeader) -> None:
        c = self._counts
        c[fh.kind - 1] += 1
        c[4 if fh.kind in (FrameKind.RAW, FrameKind.ZSTD) else 5] += fh.length
        c[6] += fh.payload_length

    def _finish(self, tag: bytes, pos: int, digest: bytes) -> None:
        rest = self._read(TRAILER.size - TAG_SIZE)
        if len(rest) < TRAILER.size - TAG_SIZE:
            raise DeltaFormatError("delta trailer", pos, "truncated", self.path)
        trailer = parse_trailer(tag + rest, pos, self.path)
        if trailer.counts() != tuple(self._counts):
            raise DeltaFormatError("delta trailer", pos, f"counts {trailer.counts()} disagree with the "
                                   f"frames read {tuple(self._counts)}", self.path)
        if trailer.digest != digest:
            raise DeltaFormatError("delta trailer", pos, "XXH3-128 of the stream does not match", self.path)
        if self._read(1):
            raise DeltaFormatError("delta trailer", self.position - 1, "data after the trailer", self.path)
        self.trailer = trailer


def verify_stream(source, *, max_block: int = MAX_BLOCK, path: str | None = None
                  ) -> tuple[StreamHeader, Trailer]:
    """Read a whole stream and check everything; nothing is kept. Raises DeltaFormatError on any fault."""
    dec = DeltaDecoder(source, max_block=max_block, path=path)
    for _ in dec:
        pass
    return dec.header, dec.trailer

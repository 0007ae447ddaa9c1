"""The delta stream's binary layout: constants, and pack/parse of the header, frame headers and trailer.

One format serves the wire, the replica's spool and seed media, so everything here is strict: every
structure carries a CRC-32C, every field is range-checked, and a parse error names the structure and its
byte offset in the stream. Layout and rationale: docs/delta-format.md.
"""
from __future__ import annotations

import enum
import json
import math
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..errors import FormatError, UnsupportedFeature, UsageError
from ..kernels import crc32c

KiB, MiB = 1 << 10, 1 << 20

MAGIC = b"RPLDELTA"
VERSION = 1
DEFAULT_BLOCK = 1 * MiB          # frame plain-size limit unless the header says otherwise
MIN_BLOCK = 512
MAX_BLOCK = 16 * MiB             # hard cap: no frame may make a decoder hold more plain bytes than this
MAX_HEADER_BODY = 64 * KiB       # the JSON body; bounds what a hostile header can make us parse
MAX_RUN = 1 << 31                # longest ZERO or TRIM frame (lengths are u32; the encoder splits longer)
MAX_LANES = 16                   # zstd lanes a stream may use (each costs a decoder one zstd context)
OPTIONAL_FIELDS = frozenset({"zstd_lanes"})
MAX_WINDOW = 8 * MiB             # zstd window the decoder accepts (level 19 needs 8 MiB; level 1, 512 KiB)

PREFIX = struct.Struct("<8sHHI")              # magic, version, flags, body length
FRAME = struct.Struct("<4sB3sQII16sI")        # tag, kind, reserved, offset, length, payload length, digest, crc
TRAILER = struct.Struct("<4s4sQQQQQQQ16sI")   # tag, reserved, 4 counts, plain, zeroed, payload, digest, crc
FRAME_TAG = b"DFRM"
TRAILER_TAG = b"DEND"
TAG_SIZE = 4
NO_DIGEST = bytes(16)

CONSISTENCY = ("crash", "application", "inconsistent")   # inconsistent: a fuzzy copy, whole only with the log after it
KINDS = ("delta", "full", "resync")
U63 = (1 << 63) - 1


class DeltaFormatError(FormatError):
    """A delta stream is malformed, corrupt or truncated: nothing from it may be trusted past this point."""


class UnsupportedDeltaVersion(DeltaFormatError, UnsupportedFeature):
    """A well-formed stream of a format version this build does not know."""


class FrameKind(enum.IntEnum):
    RAW = 1      # payload is the plain data
    ZSTD = 2     # payload is the next piece of the stream's zstd stream, flushed at the frame's end
    ZERO = 3     # the range reads as zeros; no payload
    TRIM = 4     # the range was discarded (replicas make it read as zeros); no payload


DATA_KINDS = (FrameKind.RAW, FrameKind.ZSTD)
_KIND_VALUES = frozenset(int(k) for k in FrameKind)


# ---------------------------------------------------------------------------------------------- header
@dataclass(frozen=True)
class StreamHeader:
    """What the stream is for: which disk, which cycle, what the replica must already hold."""
    disk_id: uuid.UUID
    disk_size: int
    block_size: int = DEFAULT_BLOCK
    generation: int = 0
    base_generation: int = 0
    consistency: str = "crash"
    source_logs: list[uuid.UUID] = field(default_factory=list)
    created: float = 0.0
    kind: str = "delta"
    extra: dict = field(default_factory=dict)
    zstd_lanes: int = 1          # independent zstd streams the ZSTD frames take turns in (compressed in parallel)

    def __post_init__(self) -> None:
        problem = _header_problem(self)
        if problem:
            raise UsageError(f"delta stream header: {problem}")

    def body(self) -> dict[str, Any]:
        body = {"disk_id": str(self.disk_id), "disk_size": self.disk_size, "block_size": self.block_size,
                "generation": self.generation, "base_generation": self.base_generation,
                "consistency": self.consistency, "source_logs": [str(u) for u in self.source_logs],
                "created": self.created, "kind": self.kind, "extra": self.extra}
        if self.zstd_lanes != 1:             # absent means one lane: single-lane streams keep their bytes
            body["zstd_lanes"] = self.zstd_lanes
        return body

    def pack(self) -> bytes:
        """Canonical bytes (sorted keys, compact JSON): the same header always packs the same way."""
        try:
            body = json.dumps(self.body(), sort_keys=True, separators=(",", ":"), allow_nan=False,
                              ensure_ascii=True).encode()
        except (TypeError, ValueError) as e:
            raise UsageError(f"delta stream header: extra is not plain JSON: {e}") from None
        if len(body) > MAX_HEADER_BODY:
            raise UsageError(f"delta stream header: {len(body)} bytes of JSON exceed {MAX_HEADER_BODY}")
        raw = PREFIX.pack(MAGIC, VERSION, 0, len(body)) + body
        return raw + struct.pack("<I", crc32c(raw))


def _is_int(v: Any, lo: int = 0, hi: int = U63) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _header_problem(h: StreamHeader) -> str | None:
    """Why a header is unacceptable (None if it is fine); shared by construction and parsing."""
    if not isinstance(h.disk_id, uuid.UUID):
        return "disk_id must be a UUID"
    if not _is_int(h.disk_size):
        return f"disk_size {h.disk_size!r} is not a size"
    if not _is_int(h.block_size, MIN_BLOCK, MAX_BLOCK) or h.block_size % MIN_BLOCK:
        return f"block_size {h.block_size!r} is not a multiple of {MIN_BLOCK} in [{MIN_BLOCK}, {MAX_BLOCK}]"
    if not _is_int(h.generation) or not _is_int(h.base_generation):
        return "generation and base_generation must be integers >= 0"
    if h.consistency not in CONSISTENCY:
        return f"consistency {h.consistency!r} is not one of {CONSISTENCY}"
    if h.kind not in KINDS:
        return f"kind {h.kind!r} is not one of {KINDS}"
    if not isinstance(h.source_logs, list) or not all(isinstance(u, uuid.UUID) for u in h.source_logs):
        return "source_logs must be a list of UUIDs"
    if not isinstance(h.created, (int, float)) or isinstance(h.created, bool) or not math.isfinite(h.created):
        return f"created {h.created!r} is not a finite unix time"
    if not isinstance(h.extra, dict):
        return "extra must be a JSON object"
    if not _is_int(h.zstd_lanes, 1, MAX_LANES):
        return f"zstd_lanes {h.zstd_lanes!r} is not in [1, {MAX_LANES}]"
    return None


def read_header(read, path: str | None = None) -> tuple[StreamHeader, bytes]:
    """Parse the header from a `read(n)` callable; returns it and the exact bytes it occupied."""
    prefix = read(PREFIX.size)
    if len(prefix) < PREFIX.size:
        raise DeltaFormatError("delta header", 0, f"truncated: {len(prefix)} of {PREFIX.size} bytes", path)
    magic, version, flags, length = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise DeltaFormatError("delta header", 0, f"bad magic {magic!r}: not a delta stream", path)
    if version != VERSION:
        raise UnsupportedDeltaVersion("delta header", 8, f"format version {version} (this build reads "
                                      f"{VERSION})", path)
    if length > MAX_HEADER_BODY:
        raise DeltaFormatError("delta header", 12, f"body length {length} exceeds {MAX_HEADER_BODY}", path)
    rest = read(length + 4)
    if len(rest) < length + 4:
        raise DeltaFormatError("delta header", PREFIX.size, "truncated", path)
    raw = prefix + rest
    (crc,) = struct.unpack_from("<I", raw, PREFIX.size + length)
    if crc32c(memoryview(raw)[:PREFIX.size + length]) != crc:
        raise DeltaFormatError("delta header", PREFIX.size + length, "CRC-32C mismatch", path)
    if flags:
        raise DeltaFormatError("delta header", 10, f"unknown flags 0x{flags:x}", path)
    return _parse_body(raw[PREFIX.size:PREFIX.size + length], path), raw


def _parse_body(body: bytes, path: str | None) -> StreamHeader:
    try:
        fields = json.loads(body.decode("utf-8"))
        required = set(StreamHeader.__dataclass_fields__) - OPTIONAL_FIELDS
        if not isinstance(fields, dict) or not required <= set(fields) <= required | OPTIONAL_FIELDS:
            raise ValueError(f"fields must be exactly {sorted(required)}, optionally {sorted(OPTIONAL_FIELDS)}")
        if not isinstance(fields["source_logs"], list) or not isinstance(fields["disk_id"], str):
            raise ValueError("disk_id and source_logs must hold UUID strings")
        fields["disk_id"] = uuid.UUID(fields["disk_id"])
        fields["source_logs"] = [uuid.UUID(u) for u in fields["source_logs"]]
        return StreamHeader(**fields)
    except (ValueError, TypeError, AttributeError, RecursionError, UsageError) as e:
        raise DeltaFormatError("delta header", PREFIX.size, f"bad JSON body: {e}", path) from None


# ---------------------------------------------------------------------------------------------- frames
class FrameHeader(NamedTuple):
    kind: FrameKind
    offset: int
    length: int
    payload_length: int
    digest: bytes


def zstd_bound(length: int) -> int:
    """Largest payload a ZSTD frame of `length` plain bytes may carry (zstd's compress bound, plus room
    for the zstd frame header the stream's first ZSTD frame holds)."""
    small = (128 * KiB - length) >> 11 if length < 128 * KiB else 0
    return length + (length >> 8) + small + 64


def pack_frame(kind: FrameKind, offset: int, length: int, payload_length: int, digest: bytes) -> bytes:
    raw = FRAME.pack(FRAME_TAG, kind, bytes(3), offset, length, payload_length, digest, 0)
    return raw[:-4] + struct.pack("<I", crc32c(memoryview(raw)[:-4]))


def parse_frame(raw: bytes, header: StreamHeader, where: str, pos: int, path: str | None = None) -> FrameHeader:
    """Check one frame header against its CRC, its own rules and the stream header's bounds."""
    def bad(problem: str) -> DeltaFormatError:
        return DeltaFormatError(where, pos, problem, path)

    tag, kind, reserved, offset, length, plen, digest, crc = FRAME.unpack(raw)
    if crc32c(memoryview(raw)[:-4]) != crc:
        raise bad("frame header CRC-32C mismatch")
    if tag != FRAME_TAG or reserved != bytes(3):
        raise bad("bad tag or nonzero reserved bytes")
    if kind not in _KIND_VALUES:
        raise bad(f"unknown frame kind {kind}")
    kind = FrameKind(kind)
    if length == 0 or offset + length > header.disk_size:
        raise bad(f"range [{offset}, {offset + length}) is empty or beyond the disk size {header.disk_size}")
    if kind in DATA_KINDS:
        if length > header.block_size:
            raise bad(f"{length} plain bytes exceed the block size {header.block_size}")
        limit = length if kind == FrameKind.RAW else zstd_bound(length)
        if plen > limit or plen == 0 or (kind == FrameKind.RAW and plen != length):
            raise bad(f"payload length {plen} is impossible for a {kind.name} frame of {length} bytes")
    elif plen or digest != NO_DIGEST or length > MAX_RUN:
        raise bad(f"{kind.name} frame with a payload, a digest, or over {MAX_RUN} bytes")
    return FrameHeader(kind, offset, length, plen, digest)


# --------------------------------------------------------------------------------------------- trailer
@dataclass(frozen=True)
class Trailer:
    """Totals of the whole stream: the decoder recounts them, and the digest covers every byte before."""
    raw_frames: int = 0
    zstd_frames: int = 0
    zero_frames: int = 0
    trim_frames: int = 0
    plain_bytes: int = 0       # lengths of RAW and ZSTD frames
    zeroed_bytes: int = 0      # lengths of ZERO and TRIM frames
    payload_bytes: int = 0     # bytes of payload after the frame headers
    digest: bytes = NO_DIGEST  # XXH3-128 of the stream from its first byte up to the trailer

    @property
    def frames(self) -> int:
        return self.raw_frames + self.zstd_frames + self.zero_frames + self.trim_frames

    def counts(self) -> tuple[int, ...]:
        return (self.raw_frames, self.zstd_frames, self.zero_frames, self.trim_frames, self.plain_bytes,
                self.zeroed_bytes, self.payload_bytes)

    def pack(self) -> bytes:
        raw = TRAILER.pack(TRAILER_TAG, bytes(4), *self.counts(), self.digest, 0)
        return raw[:-4] + struct.pack("<I", crc32c(memoryview(raw)[:-4]))


def parse_trailer(raw: bytes, pos: int, path: str | None = None) -> Trailer:
    tag, reserved, *counts, digest, crc = TRAILER.unpack(raw)
    if crc32c(memoryview(raw)[:-4]) != crc:
        raise DeltaFormatError("delta trailer", pos, "CRC-32C mismatch", path)
    if tag != TRAILER_TAG or reserved != bytes(4):
        raise DeltaFormatError("delta trailer", pos, "bad tag or nonzero reserved bytes", path)
    return Trailer(*counts, digest)

"""Shared pieces of the delta tests: an in-memory disk, content generators, a small reference stream, and a
walker that finds each record of a stream so tests can damage one field and fix its CRC."""
from __future__ import annotations

import io
import random
import struct
import uuid

from replicator.delta import DeltaDecoder, DeltaEncoder, StreamHeader
from replicator.delta.format import FRAME, PREFIX, TRAILER
from replicator.disk.base import BlockDevice
from replicator.kernels import crc32c

KiB, MiB = 1 << 10, 1 << 20
DISK_ID = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
LOG_ID = uuid.UUID("11111111-2222-3333-4444-555555555555")


class MemDisk(BlockDevice):
    """A disk in a bytearray: the shadow the streams are checked against."""

    format_name = "mem"

    def __init__(self, size: int, data: bytes | None = None):
        self.size = size
        self.read_only = False
        self.buf = bytearray(data if data is not None else size)
        self.zeroed: list[tuple[int, int]] = []

    def _readinto(self, offset, buf):
        buf[:] = self.buf[offset:offset + len(buf)]

    def _write(self, offset, data):
        self.buf[offset:offset + len(data)] = data

    def _write_zeroes(self, offset, length):
        self.zeroed.append((offset, length))
        self.buf[offset:offset + length] = bytes(length)


def header(disk_size: int = 4 * MiB, block_size: int = 64 * KiB, **kw) -> StreamHeader:
    kw.setdefault("created", 1700000000.25)
    kw.setdefault("source_logs", [LOG_ID])
    kw.setdefault("generation", 7)
    kw.setdefault("base_generation", 6)
    return StreamHeader(DISK_ID, disk_size, block_size=block_size, **kw)


def content(kind: str, length: int, seed: int) -> bytes:
    """Bytes of a given character: random (incompressible), text (compressible), zeros, or a mix."""
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(length)
    if kind == "zeros":
        return bytes(length)
    if kind == "text":
        words = [rng.randbytes(rng.randrange(2, 9)).hex() for _ in range(40)]
        out = " ".join(rng.choice(words) for _ in range(length // 4 + 1)).encode()
        return out[:length]
    parts = [content(rng.choice(("random", "zeros", "text")), rng.randrange(1, 20000), rng.random())
             for _ in range(length // 5000 + 1)]
    return b"".join(parts)[:length].ljust(length, b"\0")


def encode(h: StreamHeader, ops, **kw) -> bytes:
    """ops: ("data", offset, bytes) | ("zero", offset, length) | ("trim", offset, length)."""
    out = io.BytesIO()
    enc = DeltaEncoder(h, out, **kw)
    for op, offset, arg in ops:
        if op == "data":
            enc.add_data(offset, arg)
        elif op == "zero":
            enc.add_zero(offset, arg)
        else:
            enc.add_trim(offset, arg)
    enc.finish()
    assert enc.stats.stream_bytes == len(out.getvalue())
    return out.getvalue()


def shadow(size: int, ops, base: bytes | None = None) -> bytes:
    buf = bytearray(base if base is not None else size)
    for op, offset, arg in ops:
        if op == "data":
            buf[offset:offset + len(arg)] = arg
        else:
            buf[offset:offset + arg] = bytes(arg)
    return bytes(buf)


def decode_all(stream: bytes, **kw):
    dec = DeltaDecoder(io.BytesIO(stream), **kw)
    return dec, list(dec)


def small_stream() -> tuple[StreamHeader, list, bytes]:
    """Every record kind in about 2 KiB: RAW, several ZSTD frames sharing the zstd stream, ZERO, TRIM."""
    h = header(disk_size=1 * MiB, block_size=4 * KiB, extra={"note": "t"})
    ops = [("data", 0, content("random", 700, 1)),
           ("data", 8 * KiB, content("text", 10 * KiB, 2)),
           ("zero", 64 * KiB, 128 * KiB),
           ("trim", 512 * KiB, 4 * KiB),
           ("data", 600 * KiB, content("text", 3000, 3))]
    return h, ops, encode(h, ops)


def records(stream: bytes) -> list[tuple[str, int, int]]:
    """(what, start, size) of the header, each frame header, each payload and the trailer."""
    (body_len,) = struct.unpack_from("<I", stream, 12)
    out = [("header", 0, PREFIX.size + body_len + 4)]
    pos = out[0][2]
    while stream[pos:pos + 4] == b"DFRM":
        plen = struct.unpack_from("<I", stream, pos + 20)[0]
        out.append(("frame", pos, FRAME.size))
        if plen:
            out.append(("payload", pos + FRAME.size, plen))
        pos += FRAME.size + plen
    out.append(("trailer", pos, TRAILER.size))
    return out


def refix(stream: bytes, start: int, size: int) -> bytes:
    """Recompute the CRC-32C ending the structure at [start, start+size)."""
    buf = bytearray(stream)
    buf[start + size - 4:start + size] = struct.pack("<I", crc32c(bytes(buf[start:start + size - 4])))
    return bytes(buf)


def run_with_bounded_memory(body: str, headroom: int = 256 << 20):
    """Run `body` in a fresh Python whose address space may grow by at most `headroom` bytes beyond what
    it holds after start-up: a decoder that allocates what a hostile payload claims fails there."""
    import subprocess
    import sys
    code = ("import resource\n"
            "vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
            f"resource.setrlimit(resource.RLIMIT_AS, (vm + {headroom}, resource.RLIM_INFINITY))\n") + body
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

"""Pure Python (+numpy) kernels: the reference the native module is tested against, and its fallback.

Written from the algorithms' definitions (CRC-32C: RFC 3720; XXH3: xxHash's spec), slow but exact.
Only the long-input XXH3 loop is vectorized with numpy, because its stripes within a 1 KiB block are
independent sums; everything else is plain integer code that mirrors the reference step by step.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
from collections.abc import Iterator

import numpy as np

__all__ = [
    "crc32c",
    "xxh3_128",
    "xxh3_128_blocks",
    "xxh3_128_file_blocks",
    "Xxh3Hasher",
    "zero_blocks",
    "digest_bytes",
    "block_count",
    "byte_view",
    "crc_arg",
    "default_threads",
    "thread_arg",
    "open_fd",
    "file_range",
]

name = "python"
M64 = (1 << 64) - 1
M32 = (1 << 32) - 1
_CHUNK = 1 << 20  # bytes handled per step on large inputs, so memory stays bounded

# ---------------------------------------------------------------------------------------------------
# Shared helpers (the facade's native wrappers use these too, so both sides reject the same inputs).


def byte_view(buf) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous buffer, without copying."""
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def block_count(length: int, block_size: int) -> int:
    """ceil(length / block_size), after checking block_size is a positive integer."""
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool):
        raise TypeError(f"block_size must be an int, not {type(block_size).__name__}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return -(-length // int(block_size))


def default_threads() -> int:
    """CPUs this process may run on (affinity-aware, unlike os.cpu_count() in a restricted container)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_arg(threads: int | None) -> int:
    """Check a thread count (None: all CPUs); the pure kernels accept it for the same signature."""
    if threads is None:
        return default_threads()
    if not isinstance(threads, (int, np.integer)) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    return min(int(threads), 1 << 16)  # the C side caps it lower anyway; keep it inside a C int


def crc_arg(crc: int) -> int:
    """Check a CRC-32C continuation value: an int in [0, 2**32)."""
    if not isinstance(crc, (int, np.integer)) or isinstance(crc, bool) or not 0 <= crc <= M32:
        raise ValueError(f"crc must be an int in [0, 2**32), got {crc!r}")
    return int(crc)


def digest_bytes(row) -> bytes:
    """Canonical XXH128 bytes (big-endian high64 then low64) of a (low64, high64) pair or array row."""
    low, high = int(row[0]), int(row[1])
    return struct.pack(">QQ", high, low)


@contextlib.contextmanager
def open_fd(file) -> Iterator[int]:
    """A readable fd for a path, an fd, or an object with fileno(); only a path is opened (and closed)."""
    if isinstance(file, int):
        yield file
    elif hasattr(file, "fileno"):
        yield file.fileno()
    else:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            yield fd
        finally:
            os.close(fd)


def file_range(fd: int, offset: int, length: int | None) -> tuple[int, int]:
    """(offset, length) checked against the file; length None means "to the end" (block devices too)."""
    if offset < 0 or (length is not None and length < 0):
        raise ValueError(f"offset and length must not be negative, got {offset}, {length}")
    if length is None:
        info = os.fstat(fd)
        size = info.st_size
        if not stat.S_ISREG(info.st_mode):  # a block device reports 0: ask lseek, then put it back
            here = os.lseek(fd, 0, os.SEEK_CUR)
            size = os.lseek(fd, 0, os.SEEK_END)
            os.lseek(fd, here, os.SEEK_SET)
        length = max(0, size - offset)
    return offset, length


# ---------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, init and final xor 0xFFFFFFFF.

_CRC_POLY = 0x82F63B78


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        reg = byte
        for _ in range(8):
            reg = (reg >> 1) ^ (_CRC_POLY if reg & 1 else 0)
        table.append(reg)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of data; pass a previous result as crc to continue it over more bytes."""
    table = _CRC_TABLE
    reg = ~crc_arg(crc) & M32
    view = byte_view(data)
    for start in range(0, len(view), _CHUNK):  # bytes copies of bounded size iterate fastest
        for byte in view[start:start + _CHUNK].tobytes():
            reg = table[(reg ^ byte) & 0xFF] ^ (reg >> 8)
    return ~reg & M32


# ---------------------------------------------------------------------------------------------------
# XXH3-128 with seed 0 and the default secret.

P32_1, P32_2, P32_3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D
P64_1, P64_2, P64_3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
P64_4, P64_5 = 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5

SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e"
)
assert len(SECRET) == 192

STRIPE = 64                 # bytes per accumulate step
STRIPES_PER_BLOCK = 16      # (len(SECRET) - STRIPE) // 8
BLOCK = STRIPE * STRIPES_PER_BLOCK
MIDSIZE_MAX = 240


def _r64(buf, off: int) -> int:
    return int.from_bytes(buf[off:off + 8], "little")


def _r32(buf, off: int) -> int:
    return int.from_bytes(buf[off:off + 4], "little")


def _s64(off: int) -> int:
    return _r64(SECRET, off)


def _fold64(a: int, b: int) -> int:
    """128-bit product of two 64-bit values, folded (low xor high)."""
    p = a * b
    return (p ^ (p >> 64)) & M64


def _xxh64_avalanche(h: int) -> int:
    h ^= h >> 33
    h = (h * P64_2) & M64
    h ^= h >> 29
    h = (h * P64_3) & M64
    return h ^ (h >> 32)


def _avalanche(h: int) -> int:
    h ^= h >> 37
    h = (h * 0x165667919E3779F9) & M64
    return h ^ (h >> 32)


def _bswap32(x: int) -> int:
    return int.from_bytes(x.to_bytes(4, "little"), "big")


def _bswap64(x: int) -> int:
    return int.from_bytes(x.to_bytes(8, "little"), "big")


def _len_0() -> tuple[int, int]:
    return (_xxh64_avalanche(_s64(64) ^ _s64(72)), _xxh64_avalanche(_s64(80) ^ _s64(88)))


def _len_1to3(d: bytes) -> tuple[int, int]:
    n = len(d)
    lo = (d[0] << 16) | (d[n >> 1] << 24) | d[n - 1] | (n << 8)
    hi = _bswap32(lo)
    hi = ((hi << 13) | (hi >> 19)) & M32
    return (
        _xxh64_avalanche(lo ^ (_r32(SECRET, 0) ^ _r32(SECRET, 4))),
        _xxh64_avalanche(hi ^ (_r32(SECRET, 8) ^ _r32(SECRET, 12))),
    )


def _len_4to8(d: bytes) -> tuple[int, int]:
    n = len(d)
    keyed = (_r32(d, 0) + (_r32(d, n - 4) << 32)) ^ (_s64(16) ^ _s64(24))
    m = keyed * ((P64_1 + (n << 2)) & M64)
    lo, hi = m & M64, m >> 64
    hi = (hi + (lo << 1)) & M64
    lo ^= hi >> 3
    lo ^= lo >> 35
    lo = (lo * 0x9FB21C651E98DF25) & M64
    lo ^= lo >> 28
    return lo, _avalanche(hi)


def _len_9to16(d: bytes) -> tuple[int, int]:
    n = len(d)
    in_lo, in_hi = _r64(d, 0), _r64(d, n - 8)
    m = (in_lo ^ in_hi ^ (_s64(32) ^ _s64(40))) * P64_1
    lo, hi = m & M64, m >> 64
    lo = (lo + ((n - 1) << 54)) & M64
    in_hi ^= _s64(48) ^ _s64(56)
    hi = (hi + in_hi + (in_hi & M32) * (P32_2 - 1)) & M64
    lo ^= _bswap64(hi)
    h = lo * P64_2
    h_lo, h_hi = h & M64, ((h >> 64) + hi * P64_2) & M64
    return _avalanche(h_lo), _avalanche(h_hi)


def _mix16(d: bytes, off: int, sec: int) -> int:
    return _fold64(_r64(d, off) ^ _s64(sec), _r64(d, off + 8) ^ _s64(sec + 8))


def _mix32(acc: tuple[int, int], d: bytes, off1: int, off2: int, sec: int) -> tuple[int, int]:
    lo, hi = acc
    lo = (lo + _mix16(d, off1, sec)) & M64
    lo ^= (_r64(d, off2) + _r64(d, off2 + 8)) & M64
    hi = (hi + _mix16(d, off2, sec + 16)) & M64
    hi ^= (_r64(d, off1) + _r64(d, off1 + 8)) & M64
    return lo, hi


def _mid_final(acc: tuple[int, int], n: int) -> tuple[int, int]:
    lo, hi = acc
    low = _avalanche((lo + hi) & M64)
    high = (lo * P64_1 + hi * P64_4 + n * P64_2) & M64
    return low, (-_avalanche(high)) & M64


def _len_17to128(d: bytes) -> tuple[int, int]:
    n = len(d)
    acc = ((n * P64_1) & M64, 0)
    if n > 32:
        if n > 64:
            if n > 96:
                acc = _mix32(acc, d, 48, n - 64, 96)
            acc = _mix32(acc, d, 32, n - 48, 64)
        acc = _mix32(acc, d, 16, n - 32, 32)
    acc = _mix32(acc, d, 0, n - 16, 0)
    return _mid_final(acc, n)


def _len_129to240(d: bytes) -> tuple[int, int]:
    n = len(d)
    acc = ((n * P64_1) & M64, 0)
    for i in range(4):
        acc = _mix32(acc, d, 32 * i, 32 * i + 16, 32 * i)
    acc = (_avalanche(acc[0]), _avalanche(acc[1]))
    for i in range(4, n // 32):
        acc = _mix32(acc, d, 32 * i, 32 * i + 16, 3 + 32 * (i - 4))
    acc = _mix32(acc, d, n - 16, n - 32, 136 - 17 - 16)
    return _mid_final(acc, n)


def _short(d: bytes) -> tuple[int, int]:
    n = len(d)
    if n == 0:
        return _len_0()
    if n <= 3:
        return _len_1to3(d)
    if n <= 8:
        return _len_4to8(d)
    if n <= 16:
        return _len_9to16(d)
    if n <= 128:
        return _len_17to128(d)
    return _len_129to240(d)


# Long inputs: 8 lanes of 64-bit accumulators, fed 64 bytes (one stripe) at a time.
_INIT_ACC = (P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1)
_SWAP = np.array([1, 0, 3, 2, 5, 4, 7, 6])
_WORDS = np.frombuffer(SECRET, dtype="<u8").astype(np.uint64)
_STRIPE_KEYS = np.stack([_WORDS[s:s + 8] for s in range(STRIPES_PER_BLOCK)])  # stripe s uses SECRET[8s:8s+64]
_SCRAMBLE_KEY = _WORDS[16:24]                                                # SECRET[128:192]
_LAST_KEY = np.array([_s64(121 + 8 * i) for i in range(8)], dtype=np.uint64)  # SECRET[121:185]
_CHUNK_BLOCKS = 1024  # blocks vectorized at once: bounds the temporaries to a few MiB


def _stripe_sums(words: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Sum over stripes of what each stripe adds to the 8 lanes; words has shape (..., stripes, 8)."""
    keyed = words ^ keys
    product = (keyed & np.uint64(M32)) * (keyed >> np.uint64(32))
    return product.sum(axis=-2, dtype=np.uint64) + words[..., _SWAP].sum(axis=-2, dtype=np.uint64)


def _scramble(acc: np.ndarray) -> np.ndarray:
    acc = acc ^ (acc >> np.uint64(47)) ^ _SCRAMBLE_KEY
    return acc * np.uint64(P32_1)


def _merge(acc: np.ndarray, sec: int, start: int) -> int:
    lanes = [int(x) for x in acc]
    total = start
    for i in range(4):
        total += _fold64(lanes[2 * i] ^ _s64(sec + 16 * i), lanes[2 * i + 1] ^ _s64(sec + 16 * i + 8))
    return _avalanche(total & M64)


class Xxh3Hasher:
    """Streaming XXH3-128 (seed 0) holding at most one 1 KiB block plus a 64-byte tail."""

    def __init__(self, data=None):
        self._acc = np.array(_INIT_ACC, dtype=np.uint64)
        self._pending = bytearray()  # 1..BLOCK unconsumed bytes (0 only before any data)
        self._tail = b""             # last stripe of the consumed data, for the final overlapping stripe
        self._total = 0
        if data is not None:
            self.update(data)

    def update(self, data) -> None:
        """Absorb more bytes; full blocks are consumed only when at least one more byte follows."""
        view = byte_view(data)
        if not len(view):
            return
        self._total += len(view)
        pos = 0
        if self._pending:
            need = BLOCK - len(self._pending)
            if len(view) <= need:
                self._pending += view
                return
            self._pending += view[:need]
            self._consume(memoryview(self._pending))
            pos = need
        full = (len(view) - pos - 1) // BLOCK
        if full:
            self._consume(view[pos:pos + full * BLOCK])
            pos += full * BLOCK
        self._pending = bytearray(view[pos:])

    def _consume(self, view: memoryview) -> None:
        """Accumulate and scramble whole blocks (len(view) is a multiple of BLOCK)."""
        for start in range(0, len(view), _CHUNK_BLOCKS * BLOCK):
            part = view[start:start + _CHUNK_BLOCKS * BLOCK]
            words = np.frombuffer(part, dtype="<u8").reshape(-1, STRIPES_PER_BLOCK, 8)
            sums = _stripe_sums(words, _STRIPE_KEYS)
            acc = self._acc
            for block_sum in sums:
                acc = _scramble(acc + block_sum)
            self._acc = acc
        self._tail = bytes(view[-STRIPE:])

    def intdigest(self) -> tuple[int, int]:
        """(low64, high64) of everything absorbed so far; the state is left untouched."""
        if self._total <= MIDSIZE_MAX:
            return _short(bytes(self._pending))
        rest = bytes(self._pending)
        stripes = (len(rest) - 1) // STRIPE
        acc = self._acc
        if stripes:
            words = np.frombuffer(rest, dtype="<u8", count=stripes * 8).reshape(stripes, 8)
            acc = acc + _stripe_sums(words, _STRIPE_KEYS[:stripes])
        last = np.frombuffer((self._tail + rest)[-STRIPE:], dtype="<u8")
        acc = acc + _stripe_sums(last.reshape(1, 8), _LAST_KEY)
        n = self._total
        return _merge(acc, 11, (n * P64_1) & M64), _merge(acc, 192 - 64 - 11, ~(n * P64_2) & M64)

    def digest(self) -> bytes:
        return digest_bytes(self.intdigest())

    def hexdigest(self) -> str:
        return self.digest().hex()

    def copy(self) -> "Xxh3Hasher":
        other = Xxh3Hasher.__new__(Xxh3Hasher)
        other._acc = self._acc.copy()
        other._pending = bytearray(self._pending)
        other._tail = self._tail
        other._total = self._total
        return other


def _xxh3_pair(view: memoryview) -> tuple[int, int]:
    if len(view) <= MIDSIZE_MAX:
        return _short(view.tobytes())
    return Xxh3Hasher(view).intdigest()


def xxh3_128(data) -> bytes:
    """XXH3-128 (seed 0) of data as the canonical 16 bytes (what `xxhsum -H2` prints)."""
    return digest_bytes(_xxh3_pair(byte_view(data)))


def xxh3_128_blocks(buf, block_size: int, threads: int | None = None) -> np.ndarray:
    """(n, 2) uint64 array of (low64, high64) per block_size chunk; threads is checked, then ignored."""
    thread_arg(threads)
    view = byte_view(buf)
    n = block_count(len(view), block_size)
    out = np.empty((n, 2), dtype=np.uint64)
    for i in range(n):
        out[i] = _xxh3_pair(view[i * block_size:(i + 1) * block_size])
    return out


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise OSError(errno.ENODATA, "file ended before the requested range", offset + len(data))
        data += more
    return data


def xxh3_128_file_blocks(file, block_size: int, threads: int | None = None, offset: int = 0,
                         length: int | None = None) -> np.ndarray:
    """xxh3_128_blocks of bytes [offset, offset + length) of a file (path, fd or file object)."""
    thread_arg(threads)
    with open_fd(file) as fd:
        offset, length = file_range(fd, offset, length)
        n = block_count(length, block_size)
        out = np.empty((n, 2), dtype=np.uint64)
        for i in range(n):
            start = i * block_size
            size = min(block_size, length - start)
            hasher = Xxh3Hasher()
            for pos in range(start, start + size, 1 << 20):
                hasher.update(_pread_exact(fd, min(1 << 20, start + size - pos), offset + pos))
            out[i] = hasher.intdigest()
    return out


# ---------------------------------------------------------------------------------------------------


def zero_blocks(buf, block_size: int, threads: int | None = None) -> np.ndarray:
    """Boolean array: True where the block_size chunk (last one may be short) is all zero bytes."""
    thread_arg(threads)
    view = byte_view(buf)
    n = block_count(len(view), block_size)
    out = np.empty(n, dtype=bool)
    if n:
        data = np.frombuffer(view, dtype=np.uint8)
        full = len(data) // block_size
        step = max(1, (64 * _CHUNK) // block_size)  # blocks per numpy call: bounds the temporaries
        for first in range(0, full, step):
            last = min(full, first + step)
            out[first:last] = ~data[first * block_size:last * block_size].reshape(-1, block_size).any(axis=1)
        if full < n:
            out[full] = not data[full * block_size:].any()
    return out


def byte_sum(data) -> int:
    """Sum of all bytes (MS-HRL checksums are its one's complement)."""
    view = byte_view(data)
    return int(np.frombuffer(view, dtype=np.uint8).sum(dtype=np.uint64)) if len(view) else 0

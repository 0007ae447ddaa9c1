"""Hot loops of replicator: CRC-32C, XXH3-128 (one-shot, per block, streaming), zero-block detection,
the replica's apply of a delta stream's data frames (FrameApplier, native only: see _apply.py), and the
export's request path for plain writes and reads (NbdExport, with ReadPool's threads for reads that wait for
the device; native only: see _nbdserve.py).

The native cffi module (native/kernels.c) is used when it imports and passes its known-answer self-test;
otherwise the pure Python module gives identical results, slowly. REPLICATOR_KERNELS=python forces the
fallback (e.g. to bypass a bad build), REPLICATOR_KERNELS=native makes a missing native module an error.

`implementation` says which one is active; `native` and `pure` expose both so tests can compare them.
"""
from __future__ import annotations

import os
import types
import warnings

import numpy as np

from replicator.errors import KernelSelfTestError

from . import _pure as pure
from . import _selftest
from ._apply import NO_MEMORY, ApplyFailure, ApplyFrame, make_applier_class
from ._nbdserve import make_nbd_export_class, make_read_pool_class
from ._pure import block_count, crc_arg, default_threads, digest_bytes, file_range, open_fd, thread_arg

__all__ = [
    "crc32c",
    "xxh3_128",
    "xxh3_128_blocks",
    "xxh3_128_file_blocks",
    "Xxh3Hasher",
    "zero_blocks",
    "byte_sum",
    "digest_bytes",
    "default_threads",
    "self_test",
    "implementation",
    "native",
    "pure",
    "KernelSelfTestError",
    "FrameApplier",
    "ApplyFrame",
    "ApplyFailure",
    "NbdExport",
    "ReadPool",
]

_ffi = None
_lib = None


# ---------------------------------------------------------------------------------------------------
# Native wrappers. ffi.from_buffer gives C a pointer into the caller's buffer (no copy); `with` releases
# the export at once, so an mmap can be closed right after the call.


def _native_crc32c(data, crc: int = 0) -> int:
    """CRC-32C of data; pass a previous result as crc to continue it over more bytes."""
    crc = crc_arg(crc)
    if type(data) is bytes:
        return _lib.rk_crc32c(crc, data, len(data))
    with _ffi.from_buffer(data) as p:
        return _lib.rk_crc32c(crc, p, len(p))


def _native_xxh3_128(data) -> bytes:
    """XXH3-128 (seed 0) as the canonical 16 bytes, as `xxhsum -H2` prints them."""
    out = _ffi.new("uint64_t[2]")
    if type(data) is bytes:
        _lib.rk_xxh3_128(data, len(data), out)
    else:
        with _ffi.from_buffer(data) as p:
            _lib.rk_xxh3_128(p, len(p), out)
    return digest_bytes(out)


def _native_xxh3_128_blocks(buf, block_size: int, threads: int | None = None) -> np.ndarray:
    """(n, 2) uint64 (low64, high64) per block; the C loop runs without the GIL, on several threads."""
    nthreads = thread_arg(threads)
    with _ffi.from_buffer(buf) as p:
        n = block_count(len(p), block_size)
        out = np.empty((n, 2), dtype=np.uint64)
        if n:
            with _ffi.from_buffer("uint64_t[]", out, require_writable=True) as o:
                _lib.rk_xxh3_128_blocks(p, len(p), block_size, o, nthreads)
    return out


def _native_xxh3_128_file_blocks(file, block_size: int, threads: int | None = None, offset: int = 0,
                                 length: int | None = None) -> np.ndarray:
    """xxh3_128_blocks of a file's bytes, read with pread() by C threads: no mmap page-table cost."""
    nthreads = thread_arg(threads)
    with open_fd(file) as fd:
        offset, length = file_range(fd, offset, length)
        n = block_count(length, block_size)
        out = np.empty((n, 2), dtype=np.uint64)
        if n:
            with _ffi.from_buffer("uint64_t[]", out, require_writable=True) as o:
                err = _lib.rk_xxh3_128_fd_blocks(fd, offset, length, block_size, o, nthreads)
            if err:
                raise OSError(err, f"{os.strerror(err)} (hashing {file!r})")
    return out


def _native_zero_blocks(buf, block_size: int, threads: int | None = None) -> np.ndarray:
    """Boolean array: True where the block (last one may be short) is all zero bytes."""
    nthreads = thread_arg(threads)
    with _ffi.from_buffer(buf) as p:
        n = block_count(len(p), block_size)
        out = np.empty(n, dtype=np.uint8)
        if n:
            with _ffi.from_buffer("uint8_t[]", out, require_writable=True) as o:
                _lib.rk_zero_blocks(p, len(p), block_size, o, nthreads)
    return out.view(bool)


def _native_byte_sum(data) -> int:
    """Sum of all bytes (MS-HRL checksums are its one's complement)."""
    if type(data) is bytes:
        return _lib.rk_byte_sum(data, len(data))
    with _ffi.from_buffer(data) as p:
        return _lib.rk_byte_sum(p, len(p))


class _NativeXxh3Hasher:
    """Streaming XXH3-128 (seed 0) on xxHash's native state."""

    __slots__ = ("_state",)

    def __init__(self, data=None):
        state = _lib.rk_xxh3_new()
        if state == _ffi.NULL:
            raise MemoryError("XXH3 state")
        self._state = _ffi.gc(state, _lib.rk_xxh3_free)
        if data is not None:
            self.update(data)

    def update(self, data) -> None:
        if type(data) is bytes:
            _lib.rk_xxh3_update(self._state, data, len(data))
            return
        with _ffi.from_buffer(data) as p:
            _lib.rk_xxh3_update(self._state, p, len(p))

    def intdigest(self) -> tuple[int, int]:
        out = _ffi.new("uint64_t[2]")
        _lib.rk_xxh3_digest(self._state, out)
        return int(out[0]), int(out[1])

    def digest(self) -> bytes:
        return digest_bytes(self.intdigest())

    def hexdigest(self) -> str:
        return self.digest().hex()

    def copy(self) -> "_NativeXxh3Hasher":
        other = _NativeXxh3Hasher()
        _lib.rk_xxh3_copy(other._state, self._state)
        return other


_NativeXxh3Hasher.__name__ = _NativeXxh3Hasher.__qualname__ = "Xxh3Hasher"

_ISA_NAMES = ("portable", "sse2", "avx2", "avx512")  # rk_isa() levels


def _native_isa() -> str:
    """Instruction set the native XXH3 loop uses (and whether crc32 is in hardware)."""
    crc = "+crc32" if _lib.rk_crc32c_hw() else ""
    return _ISA_NAMES[_lib.rk_isa()] + crc


def _load_native(required: bool) -> types.SimpleNamespace | None:
    """The native namespace, or None (with a warning) when the compiled module is missing."""
    global _ffi, _lib
    try:
        from . import _native
    except ImportError as exc:
        if required:
            raise
        warnings.warn(f"replicator.kernels: native module unavailable ({exc}); "
                      "using the pure Python fallback (much slower)", RuntimeWarning, stacklevel=3)
        return None
    _ffi, _lib = _native.ffi, _native.lib
    return types.SimpleNamespace(
        name="native", crc32c=_native_crc32c, xxh3_128=_native_xxh3_128,
        xxh3_128_blocks=_native_xxh3_128_blocks, xxh3_128_file_blocks=_native_xxh3_128_file_blocks,
        Xxh3Hasher=_NativeXxh3Hasher,
        zero_blocks=_native_zero_blocks, byte_sum=_native_byte_sum, digest_bytes=digest_bytes, isa=_native_isa,
        FrameApplier=make_applier_class(_ffi, _lib), NbdExport=make_nbd_export_class(_ffi, _lib),
        ReadPool=make_read_pool_class(_ffi, _lib), ffi=_ffi,
        lib=_lib)


def self_test(kernels=None) -> None:
    """Run the known-answer test on an implementation (default: the active one)."""
    target = kernels if kernels is not None else _active
    _selftest.run(target, getattr(target, "name", getattr(target, "__name__", "kernels")))


def _choose():
    """(native namespace or None, active implementation), per REPLICATOR_KERNELS; native must pass its KAT."""
    mode = os.environ.get("REPLICATOR_KERNELS", "").strip().lower()
    if mode in ("python", "pure"):
        return None, pure
    if mode not in ("", "auto", "native"):
        warnings.warn(f"REPLICATOR_KERNELS={mode!r} not understood (python|native|auto); using auto",
                      RuntimeWarning, stacklevel=3)
    loaded = _load_native(required=mode == "native")
    if loaded is None:
        return None, pure
    _selftest.run(loaded, "native")
    return loaded, loaded


native, _active = _choose()
implementation: str = "native" if _active is native else "python"

crc32c = _active.crc32c
xxh3_128 = _active.xxh3_128
xxh3_128_blocks = _active.xxh3_128_blocks
xxh3_128_file_blocks = _active.xxh3_128_file_blocks
Xxh3Hasher = _active.Xxh3Hasher
zero_blocks = _active.zero_blocks
byte_sum = _active.byte_sum
FrameApplier = native.FrameApplier if native is not None and _active is native else None   # None: decode in Python
NbdExport = native.NbdExport if native is not None and _active is native else None   # None: the export's Python path
ReadPool = native.ReadPool if NbdExport is not None else None     # None: cold reads on Python's worker threads


def digest_prefix(read, length: int, chunk: int = 4 << 20) -> bytes:
    """XXH3-128 of the first `length` bytes that `read(offset, n)` returns (fewer if it runs short): the
    resume token a sender and a replica compare for an upload's durable prefix."""
    h, pos = Xxh3Hasher(), 0
    while pos < length:
        data = read(pos, min(chunk, length - pos))
        if not data:
            break
        h.update(data)
        pos += len(data)
    return h.digest()

"""Typed interface of replicator.kernels (native cffi module or pure Python fallback, same behaviour)."""
import mmap
import os
import types
from typing import Callable, Literal, Protocol, SupportsIndex, TypeAlias

import numpy as np
import numpy.typing as npt

from replicator.errors import KernelSelfTestError as KernelSelfTestError


# Anything exporting a C-contiguous buffer: bytes, bytearray, memoryview, mmap, numpy arrays.
Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap | npt.NDArray[np.generic]
FileArg: TypeAlias = "str | os.PathLike[str] | int | _HasFileno"

class _HasFileno(Protocol):
    def fileno(self) -> int: ...

class Xxh3Hasher:
    """Streaming XXH3-128 (seed 0)."""
    def __init__(self, data: Buffer | None = None) -> None: ...
    def update(self, data: Buffer) -> None: ...
    def intdigest(self) -> tuple[int, int]:
        """(low64, high64)."""
    def digest(self) -> bytes: ...
    def hexdigest(self) -> str: ...
    def copy(self) -> Xxh3Hasher: ...

def crc32c(data: Buffer, crc: int = 0) -> int: ...
def xxh3_128(data: Buffer) -> bytes: ...
def xxh3_128_blocks(buf: Buffer, block_size: int, threads: int | None = None) -> npt.NDArray[np.uint64]:
    """Shape (ceil(len / block_size), 2): column 0 low64, column 1 high64."""
def xxh3_128_file_blocks(file: FileArg, block_size: int, threads: int | None = None, offset: int = 0,
                         length: int | None = None) -> npt.NDArray[np.uint64]: ...
def zero_blocks(buf: Buffer, block_size: int, threads: int | None = None) -> npt.NDArray[np.bool_]: ...
def digest_prefix(read: Callable[[int, int], bytes], length: int, chunk: int = ...) -> bytes:
    """XXH3-128 of the first `length` bytes read(offset, n) gives: the resume token of an upload."""
def byte_sum(data: Buffer) -> int:
    """Sum of all bytes as an unsigned 64-bit integer (MS-HRL checksums)."""
def digest_bytes(row: npt.NDArray[np.uint64] | tuple[SupportsIndex, SupportsIndex]) -> bytes: ...
def default_threads() -> int: ...

class ApplyFrame:
    kind: int
    lane: int
    payload: bytes
    length: int
    digest: bytes
    segments: list[tuple[int, int, int]]
    def __init__(self, kind: int, lane: int, payload: bytes, length: int, digest: bytes,
                 segments: list[tuple[int, int, int]]) -> None: ...

NO_MEMORY: int

class ApplyFailure(Exception):
    index: int
    code: int
    message: str
    errno: int
    @property
    def is_write(self) -> bool: ...
    @property
    def is_stream(self) -> bool: ...

class _FrameApplier:
    block_size: int
    def __init__(self, lanes: int, block_size: int, max_window: int) -> None: ...
    def apply(self, frames: list[ApplyFrame], fd: int, direct_fd: int = ..., threads: int = ...) -> None: ...

FrameApplier: type[_FrameApplier] | None

class _NbdExport:
    def __init__(self) -> None: ...
    def bind_disk(self, fd: int, disk_size: int, bat: npt.NDArray[np.uint64], block_size: int, chunk_ratio: int,
                  max_len: int) -> None: ...
    def modes(self, writes: bool, reads: bool, structured: bool) -> None: ...
    @property
    def full(self) -> bool: ...
    @property
    def reads_served(self) -> int: ...
    def bind_regions(self, marked: bytearray, region_size: int) -> None: ...
    def bind_log(self, data: bytearray | None, entries: bytearray | None, entries_cap: int) -> None: ...
    def serve(self, data: Buffer, pos: int, log_len: int, entries_n: int
              ) -> tuple[int, int, int, int, int, bytes, int]: ...

NbdExport: type[_NbdExport] | None
def self_test(kernels: types.SimpleNamespace | types.ModuleType | None = None) -> None: ...

implementation: Literal["native", "python"]
native: types.SimpleNamespace | None
pure: types.ModuleType

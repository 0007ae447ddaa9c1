"""Shared helpers for the resync tests: disks of either format, a counting wrapper, reference answers."""
from __future__ import annotations

import contextlib

import numpy as np

from replicator.disk.base import BlockDevice
from replicator.disk.probe import open_disk
from replicator.disk.raw import create_raw
from replicator.resync import engine
from replicator.vhdx import create_vhdx

MiB = 1 << 20


class Counting(BlockDevice):
    """Passes everything to a real disk and records each read and write, to prove what was touched."""

    def __init__(self, inner: BlockDevice):
        self.inner = inner
        self.size, self.path, self.read_only = inner.size, inner.path, inner.read_only
        self.format_name = inner.format_name
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int]] = []
        self.zeroes: list[tuple[int, int]] = []

    def __getattr__(self, name):            # data_write_guid, virtual_disk_id, fd, io: the real disk's
        return getattr(self.__dict__["inner"], name)

    def _readinto(self, offset, buf):
        self.reads.append((offset, len(buf)))
        self.inner.readinto(offset, buf)

    def _write(self, offset, data):
        self.writes.append((offset, len(data)))
        self.inner.write(offset, data)

    def _write_zeroes(self, offset, length):
        self.zeroes.append((offset, length))
        self.inner.write_zeroes(offset, length)

    def _extents(self, offset, length):
        yield from self.inner.extents(offset, length)

    def flush(self):
        self.inner.flush()

    @property
    def bytes_read(self) -> int:
        return sum(n for _, n in self.reads)

    def blocks_written(self, bs: int) -> set[int]:
        out = set()
        for off, n in self.writes + self.zeroes:
            out.update(range(off // bs, -(-(off + n) // bs)))
        return out


def create(path: str, fmt: str, size: int) -> BlockDevice:
    if fmt == "vhdx":
        return create_vhdx(str(path), size, block_size=MiB)
    return create_raw(str(path), size)


def reopen(path: str, read_only: bool = True) -> BlockDevice:
    return open_disk(str(path), read_only=read_only)


def contents(path) -> bytes:
    with reopen(path) as d:
        return d.read(0, d.size)


def differing_blocks(a: bytes, b: bytes, bs: int) -> set[int]:
    return {i for i in range(-(-len(a) // bs)) if a[i * bs:(i + 1) * bs] != b[i * bs:(i + 1) * bs]}


def reference_digests(data: bytes, bs: int) -> np.ndarray:
    from replicator import kernels
    return kernels.xxh3_128_blocks(data, bs)


@contextlib.contextmanager
def small_windows(block_size: int, blocks: int):
    """Windows of a few blocks, so small test disks cross many windows (and checkpoints)."""
    saved = engine.WINDOW_BYTES
    engine.WINDOW_BYTES = block_size * blocks
    try:
        yield
    finally:
        engine.WINDOW_BYTES = saved


def fill(disk: BlockDevice, rng: np.random.Generator, pieces) -> None:
    """pieces: (offset, length, kind) with kind 'data' (random bytes) or 'zero' (write_zeroes)."""
    for off, n, kind in pieces:
        n = min(n, disk.size - off)
        if n <= 0:
            continue
        if kind == "zero":
            disk.write_zeroes(off, n)
        else:
            disk.write(off, rng.integers(0, 256, n, dtype=np.uint8).tobytes())


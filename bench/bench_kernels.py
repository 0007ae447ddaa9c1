"""pytest-benchmark cases for the kernels: `.venv/bin/python -m pytest bench/bench_kernels.py`.

Sizes follow the callers: 4 KiB VHDX headers and 64 KiB region tables for CRC-32C, a 64 MiB buffer
cut into replication blocks for XXH3-128 and the zero-block scan.
"""
from __future__ import annotations

import numpy as np
import pytest

import replicator.kernels as kernels

MIB = 2**20


def _random(size: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def buf64m() -> np.ndarray:
    return np.frombuffer(_random(64 * MIB), dtype=np.uint8)


@pytest.fixture(scope="module")
def sparse64m() -> np.ndarray:
    """Half the 64 KiB blocks zero, half random: what a thin disk image looks like."""
    buf = np.frombuffer(_random(64 * MIB, 2), dtype=np.uint8).copy()
    blocks = buf.reshape(-1, 65536)
    blocks[::2] = 0
    return buf


def _throughput(benchmark, nbytes: int) -> None:
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["implementation"] = kernels.implementation
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 2)


@pytest.mark.parametrize("size", [4096, 65536], ids=["4KiB", "64KiB"])
def test_crc32c(benchmark, size):
    data = _random(size)
    benchmark(kernels.crc32c, data)
    _throughput(benchmark, size)


@pytest.mark.parametrize("block_size", [65536, MIB], ids=["64KiB-blocks", "1MiB-blocks"])
@pytest.mark.parametrize("threads", [1, None], ids=["1-thread", "all-cpus"])
def test_xxh3_128_blocks_64mib(benchmark, buf64m, block_size, threads):
    benchmark(kernels.xxh3_128_blocks, buf64m, block_size, threads=threads)
    _throughput(benchmark, len(buf64m))


def test_xxh3_128_one_shot_64mib(benchmark, buf64m):
    benchmark(kernels.xxh3_128, buf64m)
    _throughput(benchmark, len(buf64m))


@pytest.mark.parametrize("block_size", [4096, 65536], ids=["4KiB-blocks", "64KiB-blocks"])
def test_zero_blocks_64mib(benchmark, sparse64m, block_size):
    benchmark(kernels.zero_blocks, sparse64m, block_size)
    _throughput(benchmark, len(sparse64m))


def test_zero_blocks_all_zero_64mib(benchmark):
    """Worst case for the early exit: every byte must be read."""
    buf = np.empty(64 * MIB, dtype=np.uint8)
    buf.fill(0)  # real pages: np.zeros could leave them all mapped to the one shared zero page
    benchmark(kernels.zero_blocks, buf, 65536)
    _throughput(benchmark, len(buf))

"""Known answers: CRC-32C check values, XXH3-128 against the xxhash package and `xxhsum -H2`."""
from __future__ import annotations

import shutil
import struct
import subprocess

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

import replicator.kernels as kernels

NO_NATIVE = "native kernels not loaded (not built, or REPLICATOR_KERNELS=python)"

IMPLS = [pytest.param(kernels.pure, id="python"),
         pytest.param(kernels.native, id="native",
                      marks=pytest.mark.skipif(kernels.native is None, reason=NO_NATIVE))]

# Every XXH3 length class and the boundaries between them, plus stripe (64) and block (1 KiB) edges.
EDGE_LENGTHS = sorted({*range(0, 20), 31, 32, 33, 63, 64, 65, 96, 97, 127, 128, 129, 130, 160, 191, 192,
                       193, 239, 240, 241, 242, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 1087,
                       1088, 1089, 2047, 2048, 2049, 4096, 16383, 16384, 16385, 65537, 1 << 20})


def _data(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed + n).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("k", IMPLS)
def test_crc32c_check_values(k):
    # "123456789" is the catalogue check value; the 32-byte vectors are RFC 3720 appendix B.4.
    assert k.crc32c(b"123456789") == 0xE3069283
    assert k.crc32c(bytes(32)) == 0x8A9136AA
    assert k.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert k.crc32c(bytes(range(32))) == 0x46DD794E
    assert k.crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert k.crc32c(b"") == 0
    assert k.crc32c(b"", 0x12345678) == 0x12345678


@pytest.mark.parametrize("k", IMPLS)
@pytest.mark.parametrize("split", [0, 1, 7, 8, 9, 100, 767, 768, 769, 3000])
def test_crc32c_continues(k, split):
    data = _data(30000, 1)
    assert k.crc32c(data[split:], k.crc32c(data[:split])) == k.crc32c(data)


@pytest.mark.parametrize("k", IMPLS)
def test_crc32c_rejects_bad_seed(k):
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError):
            k.crc32c(b"x", bad)


@pytest.mark.parametrize("k", IMPLS)
@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_xxh3_128_edge_lengths_match_xxhash_package(k, n):
    data = _data(n)
    assert k.xxh3_128(data) == xxhash.xxh3_128_digest(data)


@pytest.mark.parametrize("k", IMPLS)
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=3000))
def test_xxh3_128_matches_xxhash_package(k, data):
    assert k.xxh3_128(data) == xxhash.xxh3_128_digest(data)
    assert k.xxh3_128(data).hex() == xxhash.xxh3_128_hexdigest(data)


@pytest.mark.parametrize("k", IMPLS)
@settings(max_examples=60, deadline=None)
@given(n=st.integers(241, 200_000), seed=st.integers(0, 2**32 - 1))
def test_xxh3_128_long_inputs_match_xxhash_package(k, n, seed):
    """Many 1 KiB blocks, scrambles and a ragged last stripe: the long-input loop."""
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert k.xxh3_128(data) == xxhash.xxh3_128_digest(data)


@pytest.mark.parametrize("k", IMPLS)
@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 5000), max_size=6))
def test_streaming_matches_one_shot(k, data, cuts):
    hasher = k.Xxh3Hasher()
    start = 0
    for cut in sorted(c for c in cuts if c <= len(data)):
        hasher.update(data[start:cut])
        start = cut
    snapshot = hasher.copy()
    hasher.update(data[start:])
    assert hasher.digest() == xxhash.xxh3_128_digest(data)
    assert hasher.hexdigest() == xxhash.xxh3_128_hexdigest(data)
    assert snapshot.digest() == xxhash.xxh3_128_digest(data[:start])


@pytest.mark.parametrize("k", IMPLS)
def test_streaming_digest_leaves_state_usable(k):
    data = _data(5000, 3)
    hasher = k.Xxh3Hasher()
    for i in range(0, len(data), 333):
        hasher.update(data[i:i + 333])
        assert hasher.digest() == xxhash.xxh3_128_digest(data[:i + 333])


@pytest.mark.parametrize("k", IMPLS)
def test_blocks_match_xxhash_package(k):
    data = _data(10_000, 4)
    rows = k.xxh3_128_blocks(data, 3000)
    assert rows.shape == (4, 2) and rows.dtype == np.uint64
    for i, row in enumerate(rows):
        chunk = data[i * 3000:(i + 1) * 3000]
        assert int(row[0]) == xxhash.xxh3_128_intdigest(chunk) & ((1 << 64) - 1)
        assert int(row[1]) == xxhash.xxh3_128_intdigest(chunk) >> 64
        assert k.digest_bytes(row) == xxhash.xxh3_128_digest(chunk)


def test_digest_bytes_is_big_endian_high_then_low():
    assert kernels.digest_bytes((1, 2)) == struct.pack(">QQ", 2, 1)
    assert kernels.digest_bytes(np.array([2**64 - 1, 0], dtype=np.uint64)) == b"\x00" * 8 + b"\xff" * 8


@pytest.mark.skipif(shutil.which("xxhsum") is None, reason="xxhsum (Debian package xxhash) not installed")
@pytest.mark.parametrize("k", IMPLS)
@pytest.mark.parametrize("n", [0, 1, 17, 200, 241, 1024, 100_000, 3 << 20])
def test_xxh3_128_matches_xxhsum_H2(k, n, tmp_path):
    data = _data(n, 5)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    out = subprocess.run(["xxhsum", "-H2", str(path)], check=True, capture_output=True, text=True).stdout
    assert out.split()[0] == k.xxh3_128(data).hex()

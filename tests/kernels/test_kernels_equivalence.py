"""Native and pure kernels agree on random inputs, at every instruction-set level this CPU offers."""
from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import replicator.kernels as kernels

NO_NATIVE = "native kernels not loaded (not built, or REPLICATOR_KERNELS=python)"

native = kernels.native
pure = kernels.pure
pytestmark = pytest.mark.skipif(native is None, reason=NO_NATIVE)

# The isa fixture is set once per test, not per example: that is intended.
FIXTURE_OK = [HealthCheck.function_scoped_fixture]
ISA_LEVELS = range(native.lib.rk_isa_max() + 1) if native is not None else []


@pytest.fixture(params=ISA_LEVELS, ids=lambda level: ("portable", "sse", "avx2", "avx512")[level])
def isa(request):
    """Run the test with the native dispatch lowered to one level (portable C up to the best SIMD)."""
    assert native.lib.rk_set_isa(request.param) == request.param
    yield request.param
    native.lib.rk_set_isa(-1)  # back to the best level


# Buffers made of zero runs and random runs, so zero_blocks sees both kinds and mixed blocks.
segments = st.one_of(st.integers(0, 2500).map(bytes), st.binary(min_size=1, max_size=700))
buffers = st.lists(segments, max_size=8).map(b"".join)
block_sizes = st.one_of(st.sampled_from([1, 7, 64, 240, 241, 512, 1024, 4096]), st.integers(1, 5000))


def test_native_is_active_unless_forced_off():
    """CI must notice a build that silently fell back to Python."""
    if os.environ.get("REPLICATOR_KERNELS", "").lower() not in ("python", "pure"):
        assert kernels.implementation == "native"
        assert kernels.crc32c is native.crc32c


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=buffers, crc=st.integers(0, 2**32 - 1))
def test_crc32c_same(isa, data, crc):
    assert native.crc32c(data, crc) == pure.crc32c(data, crc)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 767, 768, 769, 4096, 24575, 24576, 24577, 65536, 100_003])
@pytest.mark.parametrize("misalign", [0, 1, 3, 7])
def test_crc32c_same_sizes_and_alignments(isa, n, misalign):
    """Crosses every loop of the hardware path: byte head, 3x8 KiB, 3x256 B, 8-byte words, byte tail."""
    raw = np.random.default_rng(n).integers(0, 256, n + misalign, dtype=np.uint8).tobytes()
    view = memoryview(raw)[misalign:]
    assert native.crc32c(view) == pure.crc32c(view)


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=buffers, block_size=block_sizes)
def test_xxh3_blocks_same(isa, data, block_size):
    got = native.xxh3_128_blocks(data, block_size, threads=1)
    want = pure.xxh3_128_blocks(data, block_size)
    assert got.shape == want.shape == (-(-len(data) // block_size), 2)
    np.testing.assert_array_equal(got, want)


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=buffers, block_size=block_sizes)
def test_zero_blocks_same(isa, data, block_size):
    got = native.zero_blocks(data, block_size)
    want = pure.zero_blocks(data, block_size)
    assert got.dtype == want.dtype == np.bool_
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("block_size", [1, 8, 255, 256, 257, 1000, 4096])
def test_zero_blocks_single_nonzero_byte_anywhere(isa, block_size):
    """A lone nonzero byte at any offset (head, middle, tail, partial last block) is found."""
    n = 3 * block_size + block_size // 2 + 1
    buf = bytearray(n)
    for pos in range(0, n, max(1, block_size // 61)):
        buf[pos] = 0x80
        expected = np.ones(-(-n // block_size), dtype=bool)
        expected[pos // block_size] = False
        np.testing.assert_array_equal(native.zero_blocks(buf, block_size), expected)
        buf[pos] = 0


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.binary(max_size=4000), cuts=st.lists(st.integers(0, 4000), max_size=5))
def test_streaming_same(isa, data, cuts):
    hashers = [native.Xxh3Hasher(), pure.Xxh3Hasher()]
    start = 0
    for cut in sorted(c for c in cuts if c <= len(data)) + [len(data)]:
        for h in hashers:
            h.update(data[start:cut])
        start = cut
    assert hashers[0].digest() == hashers[1].digest() == native.xxh3_128(data) == pure.xxh3_128(data)


def _buffer_kinds(data: bytes, tmp_path):
    path = tmp_path / "buf.bin"
    path.write_bytes(data)
    f = open(path, "rb")
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    kinds = {
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(data),
        "numpy-u8": np.frombuffer(data, dtype=np.uint8),
        "numpy-u64": np.frombuffer(data, dtype=np.uint64),
        "mmap": mm,
    }
    return kinds, (mm, f)


@pytest.mark.parametrize("impl", [native, pure], ids=["native", "python"])
def test_any_buffer_type(impl, tmp_path):
    data = bytes(4096) + os.urandom(8192)
    kinds, (mm, f) = _buffer_kinds(data, tmp_path)
    want_rows = pure.xxh3_128_blocks(data, 4096)
    for name, buf in kinds.items():
        assert impl.crc32c(buf) == pure.crc32c(data), name
        assert impl.xxh3_128(buf) == pure.xxh3_128(data), name
        np.testing.assert_array_equal(impl.xxh3_128_blocks(buf, 4096), want_rows, err_msg=name)
        assert impl.zero_blocks(buf, 4096).tolist() == [True, False, False], name
        assert impl.Xxh3Hasher(buf).digest() == pure.xxh3_128(data), name
    kinds.clear()
    mm.close()  # fails with BufferError if a kernel kept the buffer exported
    f.close()


@pytest.mark.parametrize("impl", [native, pure], ids=["native", "python"])
def test_bad_arguments(impl):
    for bad in (0, -4096):
        with pytest.raises(ValueError):
            impl.xxh3_128_blocks(b"abc", bad)
        with pytest.raises(ValueError):
            impl.zero_blocks(b"abc", bad)
    with pytest.raises(TypeError):
        impl.xxh3_128_blocks(b"abc", 1.5)
    strided = np.zeros((4, 4), dtype=np.uint8)[:, ::2]
    with pytest.raises((BufferError, TypeError, ValueError)):
        impl.xxh3_128_blocks(strided, 2)


@pytest.mark.parametrize("impl", [native, pure], ids=["native", "python"])
def test_threads_argument_checked(impl):
    for bad in (0, -1, 1.0, True):
        with pytest.raises(ValueError):
            impl.xxh3_128_blocks(b"abc", 1, threads=bad)
        with pytest.raises(ValueError):
            impl.zero_blocks(b"abc", 1, threads=bad)
    assert impl.xxh3_128_blocks(b"abc", 1, threads=np.int64(2)).shape == (3, 2)


def test_empty_buffer():
    for impl in (native, pure):
        assert impl.xxh3_128_blocks(b"", 4096).shape == (0, 2)
        assert impl.zero_blocks(bytearray(), 4096).shape == (0,)
        assert impl.crc32c(memoryview(b"")) == 0
        assert impl.Xxh3Hasher().digest() == impl.xxh3_128(b"") == bytes.fromhex(
            "99aa06d3014798d86001c324468d497f")

"""Threaded block hashing equals the single-thread result, and native calls run without the GIL."""
from __future__ import annotations

import errno
import importlib.util
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import replicator.kernels as kernels

NO_NATIVE = "native kernels not loaded (not built, or REPLICATOR_KERNELS=python)"

native = kernels.native
pytestmark = pytest.mark.skipif(native is None, reason=NO_NATIVE)

BUILDER = Path(__file__).resolve().parents[2] / "native" / "build_kernels.py"


@pytest.fixture(scope="module")
def big_buffer() -> np.ndarray:
    """24 MiB + a ragged tail: several threads' worth (2 MiB minimum each), with zero stretches."""
    size = 24 * 2**20 + 12345
    assert size // native.lib.rk_min_bytes_per_thread() >= 4
    buf = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
    buf[: 3 * 2**20] = 0
    buf[10 * 2**20: 10 * 2**20 + 65536 * 5] = 0
    return buf


@pytest.mark.parametrize("block_size", [4096, 65536, 2**20, 1_000_003, 7 * 2**20, 2**30])
@pytest.mark.parametrize("threads", [2, 3, 8, 200])
def test_threaded_blocks_equal_single_thread(big_buffer, block_size, threads):
    single = native.xxh3_128_blocks(big_buffer, block_size, threads=1)
    np.testing.assert_array_equal(native.xxh3_128_blocks(big_buffer, block_size, threads=threads), single)
    np.testing.assert_array_equal(native.zero_blocks(big_buffer, block_size, threads=threads),
                                  native.zero_blocks(big_buffer, block_size, threads=1))


def test_threaded_blocks_equal_pure(big_buffer):
    block_size = 2**20 + 1
    got = native.xxh3_128_blocks(big_buffer, block_size, threads=4)
    np.testing.assert_array_equal(got, kernels.pure.xxh3_128_blocks(big_buffer, block_size))
    assert kernels.digest_bytes(got[-1]) == kernels.pure.xxh3_128(big_buffer[(len(got) - 1) * block_size:])


def test_default_threads_is_positive():
    assert kernels.default_threads() >= 1


def test_native_call_runs_without_the_gil():
    """Structural, not timing: the C call announces it started and waits for a flag that only Python
    code on another thread can set. If cffi held the GIL during the call, that code could not run
    until the call had timed out, and the call would return 0."""
    flags = np.zeros(2, dtype=np.uint32)
    ptr = native.ffi.from_buffer("uint32_t[]", flags, require_writable=True)
    result = []
    worker = threading.Thread(target=lambda: result.append(native.lib.rk_debug_wait_flag(ptr, 20_000)))
    worker.start()
    deadline = time.monotonic() + 60
    while not flags[1] and time.monotonic() < deadline:  # Python code: needs the GIL while C runs
        pass
    flags[0] = 1
    worker.join()
    assert result == [1]


def test_python_threads_hash_concurrently(big_buffer):
    """Several Python threads in the kernels at once (the GIL is released) get the same answers."""
    want = native.xxh3_128_blocks(big_buffer, 65536, threads=1)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda t: native.xxh3_128_blocks(big_buffer, 65536, threads=t), [1, 2, 1, 3]))
    for got in results:
        np.testing.assert_array_equal(got, want)


def _emitted_wrappers(tmp_path: Path) -> str:
    spec = importlib.util.spec_from_file_location("replicator_build_kernels", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "native.c"
    module.ffibuilder.emit_c_code(str(out))
    return out.read_text()


@pytest.mark.skipif(not BUILDER.exists(), reason="source tree not available")
@pytest.mark.parametrize("function", ["rk_xxh3_128_blocks", "rk_zero_blocks", "rk_crc32c", "rk_xxh3_128",
                                      "rk_xxh3_update"])
def test_cffi_wrapper_releases_gil(function, tmp_path):
    """The generated CPython wrapper of every kernel brackets the C call with Py_BEGIN_ALLOW_THREADS."""
    source = _emitted_wrappers(tmp_path)
    body = re.search(r"\n_cffi_f_%s\(PyObject \*self, PyObject \*args\)\n\{(.*?)\n\}\n" % function, source, re.S)
    assert body is not None, f"no cffi wrapper for {function}"
    assert re.search(r"Py_BEGIN_ALLOW_THREADS.*%s\(.*Py_END_ALLOW_THREADS" % function, body.group(1), re.S)


@pytest.fixture(scope="module")
def big_file(big_buffer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kernels") / "big.bin"
    path.write_bytes(big_buffer.tobytes())
    return path


@pytest.mark.parametrize("block_size", [4096, 65536, 2**20, 2**20 + 1, 3 * 2**20 + 5, 2**30])
@pytest.mark.parametrize("threads", [1, 3])
def test_file_blocks_equal_memory_blocks(big_buffer, big_file, block_size, threads):
    """pread path: blocks smaller than the read buffer are batched, larger ones streamed."""
    got = native.xxh3_128_file_blocks(big_file, block_size, threads=threads)
    np.testing.assert_array_equal(got, native.xxh3_128_blocks(big_buffer, block_size, threads=1))


@pytest.mark.parametrize("impl", [native, kernels.pure], ids=["native", "python"])
def test_file_blocks_range_and_file_kinds(impl, big_buffer, big_file):
    offset, length = 5 * 2**20 + 3, 2**20 + 4097
    want = native.xxh3_128_blocks(big_buffer[offset:offset + length], 65536)
    np.testing.assert_array_equal(impl.xxh3_128_file_blocks(str(big_file), 65536, offset=offset, length=length),
                                  want)
    with open(big_file, "rb") as f:
        f.seek(123)
        np.testing.assert_array_equal(impl.xxh3_128_file_blocks(f, 65536, offset=offset, length=length), want)
        np.testing.assert_array_equal(
            impl.xxh3_128_file_blocks(f.fileno(), 65536, offset=offset, length=length), want)
        assert f.tell() == 123
    tail = impl.xxh3_128_file_blocks(big_file, 2**20, offset=len(big_buffer) - 10)
    assert kernels.digest_bytes(tail[0]) == kernels.pure.xxh3_128(big_buffer[-10:])
    assert impl.xxh3_128_file_blocks(big_file, 4096, offset=len(big_buffer)).shape == (0, 2)


@pytest.mark.parametrize("impl", [native, kernels.pure], ids=["native", "python"])
def test_file_blocks_past_end_of_file(impl, tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 5000)
    with pytest.raises(OSError) as info:
        impl.xxh3_128_file_blocks(path, 4096, length=9000)
    assert info.value.errno == errno.ENODATA
    with pytest.raises(ValueError):
        impl.xxh3_128_file_blocks(path, 4096, offset=-1)

"""The import-time known-answer test, and the choice between native and pure implementations."""
from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest

import replicator.kernels as kernels
from replicator.errors import KernelSelfTestError
from replicator.kernels import _selftest

NO_NATIVE = "native kernels not loaded (not built, or REPLICATOR_KERNELS=python)"

IMPLS = [pytest.param(kernels.pure, id="python"),
         pytest.param(kernels.native, id="native",
                      marks=pytest.mark.skipif(kernels.native is None, reason=NO_NATIVE))]


def _child(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "REPLICATOR_KERNELS"}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ,
                          timeout=120)


@pytest.mark.parametrize("k", IMPLS)
def test_self_test_passes(k):
    kernels.self_test(k)


def test_self_test_of_active_implementation():
    kernels.self_test()


def _wrong(kernels_ns, name, fake):
    """A copy of an implementation's namespace with one kernel replaced."""
    fields = {n: getattr(kernels_ns, n) for n in
              ("crc32c", "xxh3_128", "xxh3_128_blocks", "Xxh3Hasher", "zero_blocks", "digest_bytes")}
    fields[name] = fake
    return types.SimpleNamespace(name="patched", **fields)


class _BadHasher:
    def __init__(self):
        self._inner = kernels.pure.Xxh3Hasher()

    def update(self, data):
        self._inner.update(bytes(data)[:-1])

    def digest(self):
        return self._inner.digest()


@pytest.mark.parametrize("k", IMPLS)
@pytest.mark.parametrize("name, fake", [
    ("crc32c", lambda data, crc=0: 0x12345678),
    ("xxh3_128", lambda data: bytes(16)),
    ("xxh3_128_blocks", lambda buf, bs, threads=None: np.zeros((-(-len(buf) // bs), 2), dtype=np.uint64)),
    ("zero_blocks", lambda buf, bs, threads=None: np.ones(-(-len(buf) // bs), dtype=bool)),
    ("Xxh3Hasher", _BadHasher),
])
def test_wrong_kernel_fails_self_test(k, name, fake):
    with pytest.raises(KernelSelfTestError) as info:
        kernels.self_test(_wrong(k, name, fake))
    message = str(info.value)
    assert name in message and "expected" in message and "got" in message
    assert info.value.exit_code == 70


@pytest.mark.skipif(kernels.native is None, reason=NO_NATIVE)
def test_monkeypatched_native_kernel_fails_self_test(monkeypatch):
    monkeypatch.setattr(kernels.native, "crc32c", lambda data, crc=0: 0)
    with pytest.raises(KernelSelfTestError, match=r"crc32c.*expected 0xE3069283, got 0x00000000"):
        _selftest.run(kernels.native)


@pytest.mark.skipif(kernels.native is None, reason=NO_NATIVE)
def test_wrong_native_result_refused_at_import():
    """A build whose kernel gives a wrong answer makes `import replicator.kernels` raise."""
    # Load the compiled module by hand (importing it normally would run the package's self-test first),
    # swap one C function for a wrong one, then import the package on top of it.
    code = (
        "import importlib.util, sys, types\n"
        f"so = {kernels._native.__file__!r}\n"
        "spec = importlib.util.spec_from_file_location('replicator.kernels._native', so)\n"
        "real = importlib.util.module_from_spec(spec); spec.loader.exec_module(real)\n"
        "class Lib:\n"
        "    def __getattr__(self, name): return getattr(real.lib, name)\n"
        "    def rk_crc32c(self, crc, data, size): return 0xDEADBEEF\n"
        "sys.modules['replicator.kernels._native'] = types.SimpleNamespace(ffi=real.ffi, lib=Lib())\n"
        "import replicator.kernels\n")
    proc = _child(code)
    assert proc.returncode != 0
    assert "KernelSelfTestError" in proc.stderr and "crc32c" in proc.stderr and "0xDEADBEEF" in proc.stderr


def test_env_forces_python():
    proc = _child("import replicator.kernels as k; print(k.implementation, k.native, k.crc32c.__module__)",
                  REPLICATOR_KERNELS="python")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["python", "None", "replicator.kernels._pure"]


def test_missing_native_falls_back_with_warning():
    code = ("import sys, warnings\n"
            "sys.modules['replicator.kernels._native'] = None\n"  # makes the import fail
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import replicator.kernels as k\n"
            "warned = any('fallback' in str(x.message) for x in w)\n"
            "print(k.implementation, k.crc32c(b'123456789') == 0xE3069283, warned)")
    proc = _child(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["python", "True", "True"]


def test_env_native_requires_the_module():
    code = ("import sys\n"
            "sys.modules['replicator.kernels._native'] = None\n"
            "import replicator.kernels\n")
    proc = _child(code, REPLICATOR_KERNELS="native")
    assert proc.returncode != 0
    assert "_native" in proc.stderr and ("ImportError" in proc.stderr or "ModuleNotFoundError" in proc.stderr)


@pytest.mark.skipif(kernels.native is None, reason=NO_NATIVE)
def test_default_is_native():
    proc = _child("import replicator.kernels as k; print(k.implementation)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "native"

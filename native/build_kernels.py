"""cffi (API mode) builder for replicator.kernels._native; setup.py runs it through cffi_modules.

API mode, not ABI: the C compiler checks every declaration, and cffi releases the GIL around each call.
The cdef is read from kernels.h (between CDEF-BEGIN/CDEF-END) so declarations live in one place.
"""
from __future__ import annotations

import os
import re
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def _cdef_text() -> str:
    """The plain-C part of kernels.h that cffi parses."""
    with open(os.path.join(HERE, "kernels.h"), encoding="utf-8") as f:
        header = f.read()
    match = re.search(r"/\* CDEF-BEGIN \*/(.*?)/\* CDEF-END \*/", header, re.S)
    if match is None:
        raise RuntimeError("native/kernels.h: CDEF-BEGIN/CDEF-END markers missing")
    return match.group(1)


def _source_path(name: str) -> str:
    """A source relative to the working directory when possible: setuptools dislikes absolute sources."""
    path = os.path.join(HERE, name)
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if rel.startswith("..") else rel


def _compile_args() -> list[str]:
    if sys.platform == "win32":
        return ["/O2"]
    # No -march: the module must run on any CPU of the architecture; SIMD is chosen at run time.
    return ["-O3", "-std=gnu11", "-pthread", "-fvisibility=hidden", "-Wall", "-Wno-unused-function"]


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "replicator.kernels._native",
    '#include "kernels.h"\n',
    sources=[_source_path("kernels.c"), _source_path("apply.c"), _source_path("nbdserve.c"),
             _source_path("readpool.c")],
    libraries=["zstd"],
    include_dirs=[HERE],
    extra_compile_args=_compile_args(),
    extra_link_args=[] if sys.platform == "win32" else ["-pthread"],
)

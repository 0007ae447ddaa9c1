"""Programs none of us wrote that the tests prove interop against. The bootstrap installs them, so a
missing one is a failure, not a skip: a green run must mean the interop was really checked."""
from __future__ import annotations

import shutil
import subprocess

import pytest


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; ./tools/bootstrap installs it")
    return path


def run(*argv, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool(argv[0]), *map(str, argv[1:])], check=check, capture_output=True, input=input)


def qemu_raw(path, fmt: str = "vhdx", out=None) -> bytes:
    """The virtual disk's bytes as qemu sees them (qemu-img convert -O raw)."""
    out = out or f"{path}.qemu.raw"
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", path, out)
    with open(out, "rb") as f:
        return f.read()


def qemu_check(path, fmt: str = "vhdx") -> subprocess.CompletedProcess:
    return run("qemu-img", "check", "-f", fmt, path, check=False)


def qemu_compare(a, b, fmt_a: str = "vhdx", fmt_b: str = "raw") -> subprocess.CompletedProcess:
    return run("qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, a, b, check=False)

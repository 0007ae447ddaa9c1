"""The `replicator` command line as an operator runs it: a subprocess, its exit code and its stderr."""
from __future__ import annotations

import os
import random
import subprocess
import sys

BIN = os.path.dirname(sys.executable)
MiB = 1 << 20


def replicator(*args, timeout: float = 120, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "replicator"), *[str(a) for a in args]], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Exit `code`, and stderr exactly one line 'replicator: error: ...' naming every one of `words`."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}; stderr:\n{proc.stderr}"
    assert len(lines) == 1 and lines[0].startswith("replicator: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


def random_vhdx(path, size: int = 24 * MiB, data: int = 16 * MiB, seed: int = 1) -> bytes:
    """A dynamic VHDX whose first `data` bytes are incompressible; returns them."""
    from replicator.vhdx import create_vhdx
    payload = random.Random(seed).randbytes(data)
    with create_vhdx(str(path), size, block_size=MiB) as d:
        d.write(0, payload)
    return payload


def leftovers(folder) -> list[str]:
    """Temporary files an output writer could have left in `folder`."""
    return sorted(n for n in os.listdir(folder) if ".partial-" in n or ".creating-" in n or ".tmp" in n)

"""Shared helpers of the tracking tests: disks, a served export, real NBD clients, coverage checks."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

from replicator.hrl import HrlReader
from replicator.tracking import TrackedDisk
from replicator.tracking.service import ExportService
from replicator.tracking.state import Sidecar
from replicator.vhdx import VhdxDisk, create_vhdx

from ..externals import run, tool

MiB = 1 << 20
KiB = 1 << 10
SYSTEM_PYTHON = "/usr/bin/python3"


def pattern(seed: int, length: int) -> bytes:
    """Deterministic, incompressible bytes; the same in the test and in the libnbd helper process."""
    return hashlib.shake_128(seed.to_bytes(8, "little")).digest(length)


def make_vhdx(path, size: int, block_size: int = MiB, fill=()) -> str:
    """A dynamic VHDX with the given (offset, bytes) already written, closed."""
    d = create_vhdx(str(path), size, block_size=block_size)
    try:
        for off, data in fill:
            d.write(off, data)
    finally:
        d.close()
    return str(path)


def tracked(path, **kw) -> TrackedDisk:
    """Open with tracking and leave initial replication behind: the replica is the disk as it is now."""
    t = TrackedDisk(str(path), **kw)
    if t.resync_required:
        t.resync_done()
    assert not t.resync_required, t.reason
    return t


def read_vhdx(path) -> bytes:
    with VhdxDisk.open(str(path), read_only=True) as d:
        return d.read(0, d.size)


def sealed_log_paths(disk_path) -> list[str]:
    sc = Sidecar(str(disk_path))
    state = sc.load()
    return [sc.log_path(r.name, state.memory_dir) for r in state.sealed_logs]


def log_ranges(paths, disk_size: int) -> list[tuple[int, int]]:
    """(offset, end) of every write recorded in the logs."""
    out = []
    for p in paths:
        with HrlReader(p, disk_size) as r:
            out += [(w.offset, w.offset + w.length) for w in r.writes if w.length]
    return out


def merge(ranges) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def uncovered(ranges, cover) -> list[tuple[int, int]]:
    """The parts of `ranges` ((start, end) pairs) outside the union of `cover` ((start, end) pairs)."""
    cov = merge(cover)
    missing = []
    for a, b in merge(ranges):
        pos = a
        for c, d in cov:
            if d <= pos or c >= b:
                continue
            if c > pos:
                missing.append((pos, c))
            pos = max(pos, d)
            if pos >= b:
                break
        if pos < b:
            missing.append((pos, b))
    return missing


def extents_as_ranges(extents) -> list[tuple[int, int]]:
    return [(o, o + n) for o, n in extents]


def differing(a: bytes, b: bytes, granularity: int) -> list[tuple[int, int]]:
    """(start, end) of every `granularity` unit where the two images differ."""
    assert len(a) == len(b)
    import numpy as np
    n = len(a) // granularity
    va = np.frombuffer(a, dtype=np.uint8)[: n * granularity].reshape(n, granularity)
    vb = np.frombuffer(b, dtype=np.uint8)[: n * granularity].reshape(n, granularity)
    idx = np.flatnonzero((va != vb).any(axis=1))
    out = [(int(i) * granularity, (int(i) + 1) * granularity) for i in idx]
    if len(a) % granularity and a[n * granularity:] != b[n * granularity:]:
        out.append((n * granularity, len(a)))
    return merge(out)


@contextlib.contextmanager
def serving(disks: dict, socket_path):
    svc = ExportService(disks, socket_path=str(socket_path)).start()
    try:
        yield svc
    finally:
        svc.stop()


def qemu_io(uri: str, *commands: str, check: bool = True, cache: str | None = None) -> subprocess.CompletedProcess:
    """qemu-io on an NBD URI. Its default cache mode is writethrough (every write carries FUA); pass
    cache="writeback" for plain writes."""
    argv = ["qemu-io", "-f", "raw"] + (["-t", cache] if cache else [])
    for c in commands:
        argv += ["-c", c]
    p = run(*argv, uri, check=False)
    out = p.stdout.decode() + p.stderr.decode()
    if check:
        assert p.returncode == 0 and "Pattern verification failed" not in out and "failed" not in out.lower(), out
    return p


def nbdinfo_json(uri: str, *extra: str) -> dict:
    p = run("nbdinfo", "--json", *extra, uri)
    return json.loads(p.stdout)


def wait_until(pred, timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def copy_file(src, dst) -> str:
    shutil.copyfile(str(src), str(dst))
    return str(dst)


# --------------------------------------------------------------------------- libnbd, via the system python3
_LIBNBD_DRIVER = r'''
import hashlib, json, sys
import nbd

def pattern(seed, length):
    return hashlib.shake_128(seed.to_bytes(8, "little")).digest(length)

h = None
for line in sys.stdin:
    req = json.loads(line)
    op = req["op"]
    try:
        if op == "connect":
            h = nbd.NBD()
            h.connect_uri(req["uri"])
            out = {"size": h.get_size()}
        elif op == "pwrite":
            h.pwrite(pattern(req["seed"], req["len"]), req["off"], nbd.CMD_FLAG_FUA if req.get("fua") else 0)
            out = {}
        elif op == "trim":
            h.trim(req["len"], req["off"])
            out = {}
        elif op == "zero":
            h.zero(req["len"], req["off"])
            out = {}
        elif op == "flush":
            h.flush()
            out = {}
        elif op == "pread":
            out = {"sha256": hashlib.sha256(h.pread(req["len"], req["off"])).hexdigest()}
        elif op == "close":
            if h is not None:
                h.shutdown()
            h = None
            out = {}
        else:
            raise ValueError(op)
        out["ok"] = True
    except nbd.Error as e:
        out = {"ok": False, "error": str(e), "errno": e.errnum}
    except Exception as e:
        out = {"ok": False, "error": f"{type(e).__name__}: {e}", "errno": None}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
'''


class LibnbdClient:
    """A long-lived /usr/bin/python3 process driving libnbd (Debian's python3-libnbd), one request a line."""

    def __init__(self):
        if not os.path.exists(SYSTEM_PYTHON):
            tool("python3")
        probe = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True)
        assert probe.returncode == 0, ("python3-libnbd is not installed for /usr/bin/python3: "
                                       + probe.stderr.decode())
        self.proc = subprocess.Popen([SYSTEM_PYTHON, "-c", _LIBNBD_DRIVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def call(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"libnbd driver died (exit {self.proc.poll()})"
        return json.loads(line)

    def ok(self, op: str, **kw) -> dict:
        r = self.call(op, **kw)
        assert r["ok"], f"{op} {kw}: {r}"
        return r

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(10)


def _cli_argv() -> list[str]:
    """The installed `replicator` command (the venv's console script), else the module via this Python."""
    script = os.path.join(os.path.dirname(sys.executable), "replicator")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "replicator.cli"]


def replicator_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(_cli_argv() + list(args), capture_output=True, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr.decode()
    return p


def track_status(disk_path) -> dict:
    return json.loads(replicator_cli("track", "status", str(disk_path), "--json").stdout)


def start_serve(disks, socket_path, *extra: str, timeout: float = 30) -> subprocess.Popen:
    """`replicator track serve DISK... --socket PATH`, returned once every export is announced. Its
    stdout lines keep arriving in proc.lines (a reader thread); stop it with stop_serve()."""
    import tempfile
    import threading
    errors = tempfile.TemporaryFile()           # a file, not a pipe: a chatty server never blocks on it
    proc = subprocess.Popen(_cli_argv() + ["track", "serve", *map(str, disks), "--socket", str(socket_path), *extra],
                            stdout=subprocess.PIPE, stderr=errors, text=True)
    proc.lines, proc.errors = [], errors

    def reader():
        for line in proc.stdout:
            proc.lines.append(line.rstrip("\n"))
    proc.reader = threading.Thread(target=reader, daemon=True)
    proc.reader.start()
    try:
        wait_until(lambda: sum(x.startswith("serving ") for x in proc.lines) >= len(disks) or proc.poll() is not None,
                   timeout, "track serve to come up")
        assert proc.poll() is None, "track serve exited"
    except AssertionError as e:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{e}: {proc.lines} {_read_errors(proc)}") from None
    return proc


def _read_errors(proc) -> str:
    proc.errors.seek(0)
    text = proc.errors.read().decode(errors="replace")
    proc.errors.close()
    return text


def stop_serve(proc: subprocess.Popen, sig: int = 15) -> str:
    """SIGTERM (a clean stop, checked) by default; returns stderr. stdout lines are in proc.lines."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("track serve did not stop")
    proc.reader.join(10)
    proc.stdout.close()
    err = _read_errors(proc)
    if sig == 15:
        assert proc.returncode == 0 and "stopped cleanly" in proc.lines, (proc.returncode, proc.lines, err)
    return err

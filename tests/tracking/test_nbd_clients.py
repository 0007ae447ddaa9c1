"""Real NBD clients that none of us wrote (nbdinfo, qemu-io, qemu-img, fio over libnbd) drive the tracked
export, and what they wrote must be on the disk and in the logs."""
from __future__ import annotations

import json
import subprocess

import pytest

from replicator.hrl import apply_chain
from replicator.tracking import nbd
from replicator.vhdx import VhdxDisk

from ..externals import qemu_compare, run, tool
from .helpers import (KiB, LibnbdClient, MiB, log_ranges, make_vhdx, merge, nbdinfo_json, qemu_io, read_vhdx,
                      sealed_log_paths, serving, tracked)

SIZE = 64 * MiB


@pytest.fixture
def served(tmp_path, monkeypatch):
    """One 64 MiB disk (1 MiB VHDX blocks), tracking, served on a Unix socket; its calls recorded (on the
    Python path: the native one writes without calling the disk's methods; test_native_io covers it)."""
    monkeypatch.setattr(nbd, "NATIVE_IO", False)
    path = make_vhdx(tmp_path / "disk.vhdx", SIZE, fill=[(5 * MiB, b"\x11" * MiB)])
    t = tracked(path)
    calls = {"flush": [], "write": [], "write_zeroes": [], "trim": []}
    order = []                          # (name, offset) of every call, in turn

    def recording(name, fn):
        def wrapper(*a, **kw):
            calls[name].append((a[:2], kw.get("fua", False)))
            order.append((name, a[0] if a else None))
            return fn(*a, **kw)
        return wrapper
    for name in calls:
        setattr(t, name, recording(name, getattr(t, name)))
    calls["order"] = order
    with serving({"disk": t}, tmp_path / "nbd.sock") as svc:
        yield svc, t, calls, path


def test_nbdinfo_reports_size_and_capabilities(served):
    svc, t, _, _ = served
    info = nbdinfo_json(svc.uri("disk"))
    assert info["protocol"] == "newstyle-fixed"
    (exp,) = info["exports"]
    assert exp["export-name"] == "disk"
    assert exp["export-size"] == SIZE
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert exp[cap] is True, cap
    assert exp["is_read_only"] is False
    assert exp["block_size_maximum"] == 32 * MiB
    assert int(run("nbdinfo", "--size", svc.uri("disk")).stdout) == SIZE


def test_nbdinfo_list_shows_every_export(tmp_path):
    a = tracked(make_vhdx(tmp_path / "a.vhdx", 8 * MiB))
    b = tracked(make_vhdx(tmp_path / "b.vhdx", 24 * MiB))
    with serving({"alpha": a, "beta": b}, tmp_path / "nbd.sock") as svc:
        info = nbdinfo_json(f"nbd+unix://?socket={svc.socket_path}", "--list")
        sizes = {e["export-name"]: e["export-size"] for e in info["exports"]}
        assert sizes == {"alpha": 8 * MiB, "beta": 24 * MiB}
        assert int(run("nbdinfo", "--size", svc.uri("alpha")).stdout) == 8 * MiB
        assert int(run("nbdinfo", "--size", svc.uri("beta")).stdout) == 24 * MiB
        # an unknown export name is refused, not silently mapped to some disk
        assert run("nbdinfo", "--size", svc.uri("gamma"), check=False).returncode != 0


def test_qemu_io_write_read_zero_discard_flush_fua(served):
    svc, t, calls, path = served
    uri = svc.uri("disk")

    def wb(*cmds, check=True):           # writeback: plain writes carry no FUA (writethrough sets it on all)
        return qemu_io(uri, *cmds, check=check, cache="writeback")

    wb("write -P 0xab 0 1M", "write -P 0x5c 1536 4k", "read -P 0xab 0 1536", "read -P 0x5c 1536 4k",
       "read -P 0xab 5632 1042944")
    assert [fua for _, fua in calls["write"]] == [False, False]
    wb("write -f -P 0x3d 3M 64k")                                   # FUA: the write, then a flush
    assert calls["write"][-1] == ((3 * MiB, b"\x3d" * 64 * KiB), False)
    at = calls["order"].index(("write", 3 * MiB))
    assert calls["order"][at + 1] == ("flush", None), "the FUA flag did not arrive"
    # WRITE_ZEROES over data written before tracking; -u (may unmap) so qemu does not set NO_HOLE, which
    # asks for provisioned zeros (test_nbd_protocol checks that path)
    wb("write -z -u 5M 512k")
    assert calls["write_zeroes"] == [((5 * MiB, 512 * KiB), False)]
    wb("discard 5632k 256k")                          # TRIM: replicator disks read trimmed ranges as zeros
    assert calls["trim"] == [((5632 * KiB, 256 * KiB), False)]
    assert len(calls["write"]) == 3                   # zeroing and discard did not fall back to writes
    wb("write -P 0x3d 7M 4k", "flush")
    # qemu skips flushes it deems redundant, so count NBD_CMD_FLUSH from libnbd (it sends what it is told)
    c = LibnbdClient()
    try:
        c.ok("connect", uri=uri)
        n0 = len(calls["flush"])
        c.ok("flush")
        c.ok("flush")
        assert len(calls["flush"]) == n0 + 2, "NBD_CMD_FLUSH did not reach the disk"
        c.ok("pwrite", off=7 * MiB + 4096, len=100, seed=1, fua=True)       # FUA: the write and a flush
        assert calls["order"][-2:] == [("write", 7 * MiB + 4096), ("flush", None)]
        c.ok("pwrite", off=7 * MiB + 4096, len=100, seed=2, fua=False)
        assert calls["order"][-1] == ("write", 7 * MiB + 4096) and len(calls["flush"]) == n0 + 3
        c.ok("close")
    finally:
        c.close()
    wb("read -P 0 5M 768k", "read -P 0x11 5888k 256k", "read -P 0x3d 3M 64k", "read -P 0 4M 1M",
       "read -P 0x3d 7M 4k")
    # a wrong pattern must be reported by qemu-io: the checks above are not vacuous
    bad = wb("read -P 0xab 3M 64k", check=False)
    assert b"Pattern verification failed" in bad.stdout + bad.stderr

    sealed = svc.cut()[0]
    assert sealed is not None
    expect = [(0, MiB), (3 * MiB, 3 * MiB + 64 * KiB), (5 * MiB, 5 * MiB + 768 * KiB), (7 * MiB, 7 * MiB + 4196)]
    assert merge(log_ranges([sealed.path], SIZE)) == expect


def test_qemu_img_convert_equals_disk(served, tmp_path):
    svc, t, _, path = served
    uri = svc.uri("disk")
    qemu_io(uri, "write -P 0x77 1000k 3000k", "write -P 0x01 63M 1M", "write -z 1500k 100k")
    out = tmp_path / "via-nbd.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out)
    got = out.read_bytes()
    expect = bytearray(SIZE)
    expect[5 * MiB:6 * MiB] = b"\x11" * MiB
    expect[1000 * KiB:4000 * KiB] = b"\x77" * (3000 * KiB)
    expect[1500 * KiB:1600 * KiB] = bytes(100 * KiB)
    expect[63 * MiB:] = b"\x01" * MiB
    assert got == bytes(expect)
    svc.stop()
    assert qemu_compare(path, out).returncode == 0          # and qemu reads the same from the VHDX file


def test_parallel_qemu_io_clients(served):
    svc, t, _, path = served
    uri = svc.uri("disk")
    bases, n, length = (8 * MiB, 40 * MiB), 150, 64 * KiB + 512      # writes cross VHDX blocks
    procs = []
    for i, base in enumerate(bases):
        cmds = []
        for k in range(n):
            cmds += ["-c", f"write -q -P {(i * n + k) % 250 + 1} {base + k * length} {length}"]
        procs.append(subprocess.Popen([tool("qemu-io"), "-f", "raw", *cmds, uri],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        out = p.communicate(timeout=120)[0]
        assert p.returncode == 0 and b"failed" not in out.lower(), out[-2000:]
    for i, base in enumerate(bases):
        qemu_io(uri, *[f"read -q -P {(i * n + k) % 250 + 1} {base + k * length} {length}" for k in range(n)])
    sealed = svc.cut()[0]
    assert merge(log_ranges([sealed.path], SIZE)) == [(b, b + n * length) for b in bases]


def _fio(uri: str, cwd, *args: str) -> dict:
    p = subprocess.run([tool("fio"), "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
                        "--verify_state_save=0", *args], capture_output=True, timeout=120, cwd=cwd)
    text = p.stdout.decode()
    assert p.returncode == 0, text + p.stderr.decode()
    return json.loads(text[text.index("{"):])


def test_fio_randwrite_verifies_and_logs_replay(served, tmp_path):
    svc, t, _, path = served
    svc.cut()
    first_pending = len(t.state.sealed_logs)
    base = t.read(0, SIZE)                      # the replica: the disk as of this cut
    rep = make_vhdx(tmp_path / "replica.vhdx", SIZE)
    with VhdxDisk.open(rep, read_only=False) as d:
        d.write(0, base)

    job = _fio(svc.uri("disk"), tmp_path, "--name=randwrite", "--rw=randwrite", "--bsrange=512-64k", "--size=32M",
               "--offset=16M", "--iodepth=8", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
               "--randrepeat=0", "--runtime=20")
    (j,) = job["jobs"]
    assert j["error"] == 0
    assert j["write"]["io_bytes"] >= 32 * MiB
    assert j["read"]["io_bytes"] > 0, "fio did not run its verify pass"

    svc.cut()
    svc.stop()
    logs = sealed_log_paths(path)[first_pending:]
    assert logs
    with VhdxDisk.open(rep, read_only=False) as d:
        apply_chain(d, logs)
    assert qemu_compare(path, rep, "vhdx", "vhdx").returncode == 0
    assert read_vhdx(path) != base                       # fio really changed the disk

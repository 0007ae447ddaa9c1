"""Image locks against real QEMU and real processes: replicator and QEMU refuse each other's disks, two
replicator writers refuse each other, read-only opens stay free, and a lock goes with its holder.

Holders are real processes: qemu-io kept interactive on a pipe, qemu-nbd, a Python child holding a
TrackedDisk, or `replicator replicate --every`. Every refusal is checked for what it names (the holder's
pid and command) and for what it leaves behind (the disk byte for byte, no tracking state, no output).
"""
from __future__ import annotations

import hashlib
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from replicator.disk.locks import lock_image
from replicator.disk.probe import open_disk
from replicator.disk.raw import create_raw, open_raw
from replicator.disk.vhd import create_vhd, open_vhd
from replicator.errors import ImageLocked
from replicator.hrl import HrlWriter
from replicator.tracking import TrackedDisk
from replicator.tracking.service import ExportService
from replicator.vhdx import VhdxDisk, create_vhdx, open_vhdx

pytestmark = pytest.mark.skipif(not (shutil.which("qemu-io") and shutil.which("qemu-img")
                                     and shutil.which("qemu-nbd")), reason="needs qemu-io, qemu-img, qemu-nbd")

MiB = 1 << 20
CLI = os.path.join(os.path.dirname(sys.executable), "replicator")
LOCKED = 15            # ImageLocked.exit_code


# ------------------------------------------------------------------------------------------ helpers
def make_vhdx(path, size=8 * MiB) -> str:
    with create_vhdx(str(path), size, block_size=MiB) as d:
        d.write(0, os.urandom(2 * MiB))
    return str(path)


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fd_locks(pid: int, path=None) -> list[str]:
    """The lock lines of every descriptor of `pid` (what the kernel says it holds), only those on `path`'s
    inode if given (the test process may hold locks of other tests' disks)."""
    inode = f":{os.stat(path).st_ino} " if path is not None else ""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                out += [ln for ln in f.read().splitlines() if "OFDLCK" in ln and inode in ln]
        except OSError:
            pass
    return out


def wait_locked(proc: subprocess.Popen, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, f"holder exited early: {proc.stderr.read() if proc.stderr else ''}"
        if fd_locks(proc.pid):
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {proc.pid} took no lock in {timeout} s")


def qemu_io_holding(path, fmt="vhdx", read_only=False) -> subprocess.Popen:
    """qemu-io with the image open (read-write unless told), kept alive on its stdin."""
    argv = ["qemu-io", "-f", fmt] + (["-r"] if read_only else []) + [str(path)]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_locked(p)
    return p


def release(p: subprocess.Popen) -> None:
    if p.stdin:
        p.stdin.close()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    if p.stderr:
        p.stderr.close()


def qemu(*argv) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


def replicator(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def assert_refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == LOCKED, f"exit {proc.returncode}; stderr:\n{proc.stderr}"
    assert len(lines) == 1 and lines[0].startswith("replicator: error: "), proc.stderr
    assert "image is locked" in lines[0]
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


HOLD_TRACKED = textwrap.dedent("""
    import sys
    from replicator.tracking import TrackedDisk
    t = TrackedDisk(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.read()
    t.close()
""")


def python_holding(path) -> subprocess.Popen:
    """A child process with the disk open as a TrackedDisk (the export's way), until its stdin closes."""
    p = subprocess.Popen([sys.executable, "-c", HOLD_TRACKED, str(path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "ready", p.stderr.read()
    return p


def read_line(p: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    assert ready, "no output in time"
    return p.stdout.readline()


# ------------------------------------------------------------------------- QEMU refuses replicator's disk
def test_qemu_refuses_a_disk_the_export_holds(tmp_path):
    disk = make_vhdx(tmp_path / "vm.vhdx")
    tracked = TrackedDisk(disk)
    svc = ExportService({"vm": tracked}, socket_path=str(tmp_path / "nbd.sock")).start()
    try:
        w = qemu("qemu-io", "-f", "vhdx", "-c", "write -P 0xab 0 64k", disk)
        assert w.returncode != 0 and 'Failed to get "write" lock' in w.stderr, w.stderr
        info = qemu("qemu-img", "info", disk)
        assert info.returncode != 0 and 'Failed to get shared "write" lock' in info.stderr, info.stderr
        forced = qemu("qemu-img", "info", "-U", disk)
        assert forced.returncode == 0 and "file format: vhdx" in forced.stdout, forced.stderr
        nbd = qemu("qemu-nbd", "-f", "vhdx", "-k", str(tmp_path / "other.sock"), disk)
        assert nbd.returncode != 0 and 'Failed to get "write" lock' in nbd.stderr, nbd.stderr
    finally:
        svc.stop()
        tracked.close()
    # closed: the lock went with it
    w = qemu("qemu-io", "-f", "vhdx", "-c", "write -P 0xab 0 64k", disk)
    assert w.returncode == 0, w.stderr
    assert qemu("qemu-img", "info", disk).returncode == 0


def test_qemu_refuses_raw_and_vhd_disks_replicator_writes(tmp_path):
    raw = create_raw(tmp_path / "d.raw", 4 * MiB)
    vhd = create_vhd(tmp_path / "d.vhd", 4 * MiB)
    try:
        for path, fmt in ((raw.path, "raw"), (vhd.path, "vpc")):
            w = qemu("qemu-io", "-f", fmt, "-c", "write 0 4k", path)
            assert w.returncode != 0 and 'Failed to get "write" lock' in w.stderr, (fmt, w.stderr)
            assert qemu("qemu-io", "-f", fmt, "-r", "-U", "-c", "read 0 4k", path).returncode == 0
    finally:
        raw.close()
        vhd.close()
    with open_raw(tmp_path / "d.raw", read_only=False) as d:     # reopened read-write: locked again
        assert qemu("qemu-io", "-f", "raw", "-c", "write 0 4k", d.path).returncode != 0
    assert qemu("qemu-io", "-f", "raw", "-c", "write 0 4k", str(tmp_path / "d.raw")).returncode == 0


def test_a_parent_read_through_a_writable_child_is_not_writable_by_qemu(tmp_path):
    parent = make_vhdx(tmp_path / "base.vhdx")
    create_vhdx(str(tmp_path / "child.vhdx"), 0, parent=parent).close()
    with VhdxDisk.open(str(tmp_path / "child.vhdx"), read_only=False) as child:
        assert child.parent is not None
        w = qemu("qemu-io", "-f", "vhdx", "-c", "write 0 4k", parent)
        assert w.returncode != 0 and 'Failed to get "write" lock' in w.stderr, w.stderr
        # a reader of the parent is fine, as it is beside QEMU's own backing-file locks
        r = qemu("qemu-io", "-f", "vhdx", "-r", "-c", "read 0 4k", parent)
        assert r.returncode == 0, r.stderr
    # a read-only child locks nothing, its parent neither
    with VhdxDisk.open(str(tmp_path / "child.vhdx")):
        assert qemu("qemu-io", "-f", "vhdx", "-c", "write 0 4k", parent).returncode == 0


# ------------------------------------------------------------------------- replicator refuses QEMU's disk
def test_replicate_refuses_a_disk_qemu_io_writes(tmp_path):
    disk = make_vhdx(tmp_path / "vm.vhdx")
    before = digest(disk)
    holder = qemu_io_holding(disk)
    try:
        line = assert_refused(replicator("replicate", disk, "--to", f"local://{tmp_path}/replica"),
                              disk, f"pid {holder.pid}", "qemu-io", "open for writing", '"write" lock')
        assert "Traceback" not in line
        assert digest(disk) == before
        assert not os.path.exists(disk + ".rpl"), "tracking state was created for a refused disk"
    finally:
        release(holder)
    ok = replicator("replicate", disk, "--to", f"local://{tmp_path}/replica")      # the same run, unheld
    assert ok.returncode == 0, ok.stderr


def test_replicator_refuses_a_disk_qemu_nbd_serves_and_opens_it_read_only(tmp_path):
    disk = make_vhdx(tmp_path / "vm.vhdx")
    before = digest(disk)
    nbd = subprocess.Popen(["qemu-nbd", "-f", "vhdx", "-k", str(tmp_path / "q.sock"), "-t", disk],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_locked(nbd)
        with pytest.raises(ImageLocked) as e:
            open_disk(disk, read_only=False)
        assert f"pid {nbd.pid} (qemu-nbd" in e.value.message and e.value.exit_code == LOCKED
        with pytest.raises(ImageLocked):
            TrackedDisk(disk)
        with open_disk(disk) as d:                          # read-only: no lock, like qemu -U
            assert d.read(0, 4096)
        assert replicator("vhdx", "info", disk).returncode == 0
        assert_refused(replicator("seed", "export", "vm01", disk, "--to", tmp_path / "media"),
                       f"pid {nbd.pid}", "qemu-nbd")
        assert not os.path.exists(tmp_path / "media" / "vm01" / "vm.vhdx.seed")
        assert digest(disk) == before and not os.path.exists(disk + ".rpl")
    finally:
        nbd.terminate()
        nbd.wait(10)
        nbd.stderr.close()


def test_raw_and_vhd_opens_refuse_a_disk_qemu_writes_and_overwrite_leaves_it_alone(tmp_path):
    raw = str(tmp_path / "d.raw")
    with create_raw(raw, 4 * MiB) as d:
        d.write(0, b"\x5a" * 65536)
    vhd = str(tmp_path / "d.vhd")
    create_vhd(vhd, 4 * MiB).close()
    holders = [qemu_io_holding(raw, "raw"), qemu_io_holding(vhd, "vpc")]
    try:
        with pytest.raises(ImageLocked, match="qemu-io"):
            open_raw(raw, read_only=False)
        with pytest.raises(ImageLocked, match="qemu-io"):
            open_vhd(vhd, read_only=False)
        before = digest(raw)
        with pytest.raises(ImageLocked):
            create_raw(raw, MiB, overwrite=True)          # would have truncated the guest's disk
        assert digest(raw) == before and os.path.getsize(raw) == 4 * MiB
    finally:
        for h in holders:
            release(h)
    open_raw(raw, read_only=False).close()
    open_vhd(vhd, read_only=False).close()


def test_a_child_whose_parent_qemu_writes_cannot_be_opened_for_writing(tmp_path):
    parent = make_vhdx(tmp_path / "base.vhdx")
    child = str(tmp_path / "child.vhdx")
    create_vhdx(child, 0, parent=parent).close()
    holder = qemu_io_holding(parent)
    try:
        with pytest.raises(ImageLocked) as e:
            VhdxDisk.open(child, read_only=False)
        assert parent in e.value.message and "parent" in e.value.message and "qemu-io" in e.value.message
        VhdxDisk.open(child).close()                        # reading it stays possible
        assert_refused(replicator("vhdx", "create", "--parent", parent, str(tmp_path / "c2.vhdx")), "qemu-io")
        assert not os.path.exists(tmp_path / "c2.vhdx")
    finally:
        release(holder)
    VhdxDisk.open(child, read_only=False).close()


def test_hrl_apply_and_resync_refuse_a_disk_qemu_writes(tmp_path):
    source = make_vhdx(tmp_path / "src.vhdx")
    target = make_vhdx(tmp_path / "dst.vhdx")
    log = str(tmp_path / "0.hrl")                           # a real log to apply
    w = HrlWriter(log)
    w.append(MiB, b"\x11" * 65536)
    w.seal()
    w.close()
    before = digest(target)
    holder = qemu_io_holding(target)
    try:
        assert_refused(replicator("hrl", "apply", target, log), f"pid {holder.pid}", "qemu-io")
        assert_refused(replicator("resync", source, target), f"pid {holder.pid}", "qemu-io")
        assert digest(target) == before
    finally:
        release(holder)
    ok = replicator("hrl", "apply", target, log)
    assert ok.returncode == 0, ok.stderr
    with open_vhdx(target) as d:
        assert d.read(MiB, 65536) == b"\x11" * 65536


# ------------------------------------------------------------------------------- two replicator writers
def test_two_replicate_runs_on_one_disk_one_is_refused(tmp_path):
    disk = make_vhdx(tmp_path / "vm.vhdx")
    first = subprocess.Popen([CLI, "replicate", disk, "--to", f"local://{tmp_path}/r1", "--every", "30s"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = read_line(first, 120)
        assert "initial cycle" in line, line
        second = replicator("replicate", disk, "--to", f"local://{tmp_path}/r2")
        assert_refused(second, f"pid {first.pid}", "replicate", "open for writing")
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(60)
        first.stdout.close()
        first.stderr.close()
    assert first.returncode == 0
    assert replicator("replicate", disk, "--to", f"local://{tmp_path}/r1").returncode == 0


def test_a_second_open_in_another_process_or_this_one_is_refused(tmp_path):
    disk = make_vhdx(tmp_path / "vm.vhdx")
    holder = python_holding(disk)
    try:
        with pytest.raises(ImageLocked) as e:
            TrackedDisk(disk)
        assert f"pid {holder.pid}" in e.value.message and "open for writing" in e.value.message
        w = qemu("qemu-io", "-f", "vhdx", "-c", "write 0 4k", disk)
        assert 'Failed to get "write" lock' in w.stderr
    finally:
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()
        holder.stderr.close()
    with open_vhdx(disk, read_only=False):
        with pytest.raises(ImageLocked, match=f"this process \\(pid {os.getpid()}\\)"):
            open_vhdx(disk, read_only=False)                 # OFD locks: one process, two opens
        open_vhdx(disk).close()                              # read-only beside it is fine
    open_vhdx(disk, read_only=False).close()


def test_the_lock_goes_with_a_killed_holder(tmp_path):
    disk = make_vhdx(tmp_path / "vm.vhdx")
    holder = python_holding(disk)
    with pytest.raises(ImageLocked):
        open_vhdx(disk, read_only=False)
    holder.kill()
    holder.wait(10)
    holder.stdout.close()
    holder.stderr.close()
    TrackedDisk(disk).close()                                # the export's open succeeds again
    q = qemu_io_holding(disk)
    os.kill(q.pid, signal.SIGKILL)
    q.wait(10)
    release(q)
    open_vhdx(disk, read_only=False).close()


# ------------------------------------------------------------------------------------- the lock bytes
def test_the_bytes_are_qemus(tmp_path):
    """A writer holds 100, 101, 103, 201, 203 exactly as qemu-io does on a VHDX; a backing-file reader
    100, 201, 203: compared with what the kernel lists for a real qemu-io."""
    disk = make_vhdx(tmp_path / "vm.vhdx")

    def spans(lines):
        return sorted((int(ln.split()[-2]), int(ln.split()[-1])) for ln in lines)

    def expand(sp):
        return sorted(b for s, e in sp for b in range(s, e + 1))

    def qemu_bytes(read_only):
        q = qemu_io_holding(disk, read_only=read_only)
        try:
            return expand(spans(fd_locks(q.pid, disk)))
        finally:
            release(q)

    def our_bytes(write):
        fd = os.open(disk, os.O_RDWR if write else os.O_RDONLY)
        try:
            lock_image(fd, disk, write=write)
            return expand(spans(fd_locks(os.getpid(), disk)))
        finally:
            os.close(fd)

    assert qemu_bytes(read_only=False) == our_bytes(write=True) == [100, 101, 103, 201, 203]
    assert qemu_bytes(read_only=True) == our_bytes(write=False) == [100, 201, 203]


# ------------------------------------------------------------------------------------- racing openers
def test_an_opener_that_steps_away_does_not_refuse_us(tmp_path):
    """Another description holding one of the bytes for a few milliseconds (a racing opener that lost and
    dropped its locks) does not make us refuse; one that stays does."""
    import threading

    from replicator.disk import locks
    disk = make_vhdx(tmp_path / "vm.vhdx")
    passing = os.open(disk, os.O_RDONLY)
    locks._fcntl(passing, locks._SETLK, locks.fcntl.F_RDLCK, 201)
    threading.Timer(0.003, os.close, (passing,)).start()
    with open_vhdx(disk, read_only=False):
        pass
    staying = os.open(disk, os.O_RDONLY)
    try:
        locks._fcntl(staying, locks._SETLK, locks.fcntl.F_RDLCK, 201)
        with pytest.raises(ImageLocked, match='"write" lock'):
            open_vhdx(disk, read_only=False)
    finally:
        os.close(staying)


RACER = textwrap.dedent("""
    import sys, time
    from replicator.errors import ImageLocked
    from replicator.vhdx import open_vhdx
    sys.stdin.readline()
    try:
        d = open_vhdx(sys.argv[1], read_only=False)
    except ImageLocked:
        print("refused", flush=True)
    else:
        print("opened", flush=True)
        time.sleep(1.5)
        d.close()
""")


def test_of_four_processes_opening_at_once_exactly_one_gets_the_disk(tmp_path):
    disk = make_vhdx(tmp_path / "vm.vhdx")
    for _ in range(2):
        procs = [subprocess.Popen([sys.executable, "-c", RACER, disk], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for _ in range(4)]
        time.sleep(1.5)                                     # all imported and waiting on their stdin
        for p in procs:
            p.stdin.write("go\n")
        for p in procs:
            p.stdin.flush()
        results = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert results == ["opened", "refused", "refused", "refused"], results

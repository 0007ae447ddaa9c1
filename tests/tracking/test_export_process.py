"""The export process (tracking/shim.py) driven from replicatord's side (tracking/remote.py): it serves the
guest, tracks, cuts and acknowledges, outlives its controller while a client is connected, is attached to
again, exits when nobody needs it, and a killed one is started again with its disk marked for resync."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from replicator import kernels, priority
from replicator.errors import ExportUnavailable
from replicator.hrl import HrlReader
from replicator.tracking import nbd, shim
from replicator.tracking.remote import ExportHandle

from ..processes import alive, autogroup_nice, sessions_get_autogroups
from .helpers import MiB, make_vhdx, pattern, qemu_io, read_vhdx, tracked, wait_until


@pytest.fixture
def disk(tmp_path):
    path = make_vhdx(tmp_path / "d0.vhdx", 64 * MiB, fill=[(0, pattern(1, MiB))])
    tracked(path).close()          # initial replication behind us: the disk is tracked
    return path


def _handle(tmp_path, disk, **kw) -> ExportHandle:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    return ExportHandle("vm1", {"d0.vhdx": disk}, str(run), **kw).start()


def test_serves_tracks_cuts_and_closes_when_detached_idle(tmp_path, disk):
    h = _handle(tmp_path, disk)
    try:
        assert h.pid != os.getpid() and alive(h.pid) and not h.adopted
        if os.geteuid() == 0:                          # the guest's requests win the CPU over replication
            assert os.getpriority(os.PRIO_PROCESS, h.pid) < os.getpriority(os.PRIO_PROCESS, 0)
        qemu_io(h.uri("d0.vhdx"), f"write -P 0x5a {4 * MiB} {MiB}")
        sealed, = h.cut()
        assert sealed is not None and sealed.data_bytes == MiB
        with HrlReader(sealed.path, 64 * MiB) as r:
            assert sum(e.length for e in r.extents()) == MiB
        d = h.disks["d0.vhdx"]
        assert d.state.sealed_logs[-1].name == os.path.basename(sealed.path)
        d.acknowledge(sealed.unique_id)
        assert d.state.sealed_logs == []
        buf = bytearray(MiB)
        d.disk.readinto(4 * MiB, buf)                  # the live disk, read through the export
        assert bytes(buf) == b"\x5a" * MiB
    finally:
        assert h.detach() is True                      # no NBD client: the export closes
    assert not alive(h.pid)
    data = read_vhdx(disk)                             # closed cleanly: the lock and the log are released
    assert data[4 * MiB:5 * MiB] == b"\x5a" * MiB and data[:MiB] == pattern(1, MiB)


def test_outlives_its_controller_while_a_client_is_connected(tmp_path, disk):
    h = _handle(tmp_path, disk)
    client = socket.socket(socket.AF_UNIX)
    client.connect(h.nbd_socket)                      # a guest's connection (handshake not needed to count)
    try:
        wait_until(lambda: h.control.call("hello")["clients"] == 1, what="the client is counted")
        assert h.detach() is False and alive(h.pid)
        again = _handle(tmp_path, disk)                # replicatord restarted: it attaches, nothing restarts
        assert again.adopted and again.pid == h.pid
        qemu_io(again.uri("d0.vhdx"), f"write -P 0x33 {8 * MiB} 4096")
        sealed, = again.cut()
        assert sealed.data_bytes == 4096
    finally:
        client.close()
    again.shutdown()
    assert not alive(h.pid)


def test_exits_on_its_own_when_its_controller_dies_and_no_client_is_left(tmp_path, disk):
    h = _handle(tmp_path, disk, idle_grace=0.5)
    h._close()                                         # as a kill -9 of replicatord: the watch drops
    wait_until(lambda: not alive(h.pid), timeout=10, what="the idle export exits")
    read_vhdx(disk)


def test_a_killed_export_is_started_again_and_its_disk_needs_a_resync(tmp_path, disk):
    h = _handle(tmp_path, disk)
    qemu_io(h.uri("d0.vhdx"), f"write -P 0x44 0 {MiB}")
    os.kill(h.pid, signal.SIGKILL)
    wait_until(lambda: not alive(h.pid), what="the export dies")
    h2 = _handle(tmp_path, disk)
    try:
        assert h2.pid != h.pid and not h2.adopted
        d = h2.disks["d0.vhdx"]
        assert d.resync_required and "not closed cleanly" in d.reason
        buf = bytearray(MiB)
        d.disk.readinto(0, buf)
        assert bytes(buf) == b"\x44" * MiB             # acknowledged writes survived the kill
    finally:
        h2.shutdown()


def test_a_disk_another_export_holds_is_refused_with_the_reason(tmp_path, disk):
    h = _handle(tmp_path, disk)
    try:
        other = tmp_path / "other"
        other.mkdir()
        with pytest.raises(ExportUnavailable) as e:
            ExportHandle("vm2", {"d0.vhdx": disk}, str(other)).start()
        assert "export process stopped" in e.value.message
    finally:
        h.shutdown()


def test_control_refuses_nonsense(tmp_path, disk):
    h = _handle(tmp_path, disk)
    try:
        with pytest.raises(Exception) as e:
            h.control.call("acknowledge", disk="nope.vhdx", unique_id="x")
        assert "no disk 'nope.vhdx'" in str(e.value)
        s = socket.socket(socket.AF_UNIX)
        s.connect(h.control_path)
        s.sendall(b"not json\n")
        assert b"malformed" in s.recv(1000)
        s.close()
        assert h.control.call("hello")["pid"] == h.pid
    finally:
        h.shutdown()
    time.sleep(0)


def test_the_export_says_how_long_the_guest_has_been_quiet(tmp_path, disk):
    """A copy's pacing asks this (replication.pacing): nothing before the guest's first write, then the
    seconds since its last write to any of the machine's disks, growing while it stays quiet. Reads and
    flushes are not writes."""
    h = _handle(tmp_path, disk)
    try:
        d = h.disks["d0.vhdx"]
        assert d.guest_quiet() is None
        qemu_io(h.uri("d0.vhdx"), "read 0 64k", "flush")
        assert d.guest_quiet() is None
        qemu_io(h.uri("d0.vhdx"), "write -z 1M 64k")
        first = d.guest_quiet()
        assert 0 <= first < 5
        time.sleep(0.3)
        assert d.guest_quiet() >= first + 0.25
        qemu_io(h.uri("d0.vhdx"), "write -P 0x61 0 4k")
        assert d.guest_quiet() < first + 0.25
        d.QUIET = "quiet-as-a-later-version-asks"     # an export that does not know the call (an older one)
        assert d.guest_quiet() is None                # unknown: the copy is not held back, and does not fail
        assert h.control.call("hello")["pid"] == h.pid
    finally:
        h.shutdown()


def test_reads_from_the_file_equal_reads_through_the_export(tmp_path):
    """The control plane reads fully present blocks from the file itself and the rest (a differencing
    disk's partly present blocks and its parent's) through the export: the same bytes either way."""
    from replicator.vhdx import create_vhdx
    parent = make_vhdx(tmp_path / "base.vhdx", 16 * MiB, fill=[(0, pattern(7, 4 * MiB))])
    child = create_vhdx(str(tmp_path / "d0.vhdx"), 16 * MiB, block_size=MiB, parent=parent)
    child.close()
    tracked(str(tmp_path / "d0.vhdx")).close()
    h = _handle(tmp_path, str(tmp_path / "d0.vhdx"))
    try:
        qemu_io(h.uri("d0.vhdx"), f"write -P 0x21 {MiB + 512} 4096", f"write -P 0x22 {6 * MiB} {2 * MiB}",
                f"write -z -u {9 * MiB} {MiB}")
        d = h.disks["d0.vhdx"]
        kinds = {k for _, _, k, _ in d._map(0, 16 * MiB)}
        assert kinds == {"file", "zero", "other"}
        reader = d.open_reader()
        try:
            direct = reader.read(0, 16 * MiB)
            through = bytearray(16 * MiB)
            reader.client.pread_into(0, memoryview(through))
        finally:
            reader.close()
        assert direct == bytes(through)
        assert direct[6 * MiB:8 * MiB] == b"\x22" * (2 * MiB) and direct[:MiB] == pattern(7, 4 * MiB)[:MiB]
    finally:
        h.shutdown()


def _slice(pid: int, tid: int) -> int | None:
    """A thread's EEVDF slice in ns (None: the kernel does not show one)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/sched") as f:
            return next((int(line.split()[-1]) for line in f if line.startswith("se.slice")), None)
    except FileNotFoundError:           # a kernel without CONFIG_SCHED_DEBUG
        return None


def _comm(pid: int, tid: int) -> str:
    with open(f"/proc/{pid}/task/{tid}/comm") as f:
        return f.read().strip()


def test_the_thread_serving_the_guest_gets_the_shortest_slice_and_its_session_the_cpu_first(tmp_path, disk):
    """The loop thread preempts replication's encoders when it wakes (a short EEVDF slice), and so do the
    threads of C that read for it; the export's other helpers do not (the default slice, though threads
    inherit their creator's), and its session's autogroup
    outweighs replicatord's, where nice values across sessions count for nothing (priority.guest_first)."""
    default, probed = _slice(os.getpid(), threading.get_native_id()), []
    probe = threading.Thread(target=lambda: (priority._set_slice(priority.GUEST_SLICE_NS),
                                             probed.append(_slice(os.getpid(), threading.get_native_id()))))
    probe.start()
    probe.join()
    if probed != [priority.GUEST_SLICE_NS]:
        pytest.skip("this kernel takes no slice per thread (Linux 6.12 and later do)")
    h = _handle(tmp_path, disk)
    try:
        qemu_io(h.uri("d0.vhdx"), f"write -P 0x44 0 {4 * MiB}")
        h.cut()                                          # the export's helper threads have run
        helpers = [int(t) for t in os.listdir(f"/proc/{h.pid}/task") if int(t) != h.pid]
        assert helpers
        assert _slice(h.pid, h.pid) == priority.GUEST_SLICE_NS
        readers = [t for t in helpers if _comm(h.pid, t) == "nbd-read"]      # the read pools': the guest's reads
        assert readers or not nbd.NATIVE_READ_POOL or kernels.ReadPool is None
        assert all(_slice(h.pid, t) == priority.GUEST_SLICE_NS for t in readers)
        assert all(_slice(h.pid, t) == default for t in helpers if t not in readers), \
            [(_comm(h.pid, t), _slice(h.pid, t)) for t in helpers]
        if os.geteuid() == 0 and sessions_get_autogroups():
            assert autogroup_nice(h.pid) == shim.PRIORITY_BOOST
    finally:
        assert h.detach() is True


def test_the_export_does_not_inherit_a_background_policy(tmp_path, disk):
    """replicatord run as background work (`chrt --idle`, systemd's CPUSchedulingPolicy=idle or batch) must
    not hand that policy to the process serving the guest: measured, a SCHED_IDLE export would wait behind
    every other task on a busy host."""
    policy = os.SCHED_IDLE if os.geteuid() == 0 else os.SCHED_BATCH   # leaving IDLE needs privilege
    os.sched_setscheduler(0, policy, os.sched_param(0))
    try:
        h = _handle(tmp_path, disk)
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    try:
        assert os.sched_getscheduler(h.pid) == os.SCHED_OTHER
        qemu_io(h.uri("d0.vhdx"), f"write -P 0x33 0 {MiB}")
        for tid in os.listdir(f"/proc/{h.pid}/task"):       # its threads too, made after the reset
            assert os.sched_getscheduler(int(tid)) == os.SCHED_OTHER, tid
    finally:
        assert h.detach() is True


def test_a_clean_stop_leaves_no_error_in_the_log(tmp_path, disk):
    """Stopped by replicatord (the control's shutdown, while its watch connection is open): the export's log
    says it stopped cleanly and holds no error (control connections still open were once left as "Task was
    destroyed but it is pending!" errors)."""
    h = _handle(tmp_path, disk)
    qemu_io(h.uri("d0.vhdx"), f"write -P 0x11 0 {MiB}")
    pid = h.pid
    h.shutdown()
    assert not alive(pid)
    with open(h.log_path) as f:
        text = f.read()
    assert "stopped cleanly" in text
    assert "ERROR" not in text and "Traceback" not in text, text[-2000:]

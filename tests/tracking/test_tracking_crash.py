"""kill -9 of `replicator track serve` under load from real clients: after a reopen the disk is in
resync-required with its reason, the dirty extents cover every region that differs from the replica, and
copying exactly those extents makes the replica identical. A clean stop under load instead leaves a
complete chain of logs that replays to the same disk."""
from __future__ import annotations

import signal
import subprocess
import time
import uuid

from replicator.hrl import apply_chain, open_chain
from replicator.tracking import TrackedDisk
from replicator.vhdx import VhdxDisk

from ..externals import qemu_compare, tool
from .helpers import (KiB, MiB, copy_file, differing, extents_as_ranges, make_vhdx, merge, pattern, read_vhdx,
                      sealed_log_paths, start_serve, stop_serve, track_status, tracked, uncovered, wait_until)

SIZE = 64 * MiB
REGION = 256 * KiB
LOADED = (16 * MiB, 56 * MiB)          # every client writes inside this range only
NO_SIZE_TRIGGER = ("--max-log-share", "100")    # fio writes ~100 MB/s: logs would outgrow half the disk


def prepare(tmp_path):
    """A disk with content, tracking from now on, closed cleanly; the replica is a copy of it."""
    path = make_vhdx(tmp_path / "disk.vhdx", SIZE, fill=[(0, pattern(1, 2 * MiB)), (20 * MiB, pattern(2, 8 * MiB)),
                                                            (60 * MiB, pattern(3, MiB))])
    t = tracked(path, region_size=REGION)
    t.close()
    replica = copy_file(path, tmp_path / "replica.vhdx")
    return path, replica


def start_load(tmp_path, uri: str) -> list[subprocess.Popen]:
    """fio (random writes of 512 B..128 KiB, random trims; until killed, at most 30 s) and qemu-io
    (2000 write-zeroes of 4..20 KiB at unaligned offsets)."""
    fio = subprocess.Popen(
        [tool("fio"), "--ioengine=nbd", f"--uri={uri}", "--thread", "--time_based", "--runtime=30", "--iodepth=4",
         "--randrepeat=0", "--verify_state_save=0",
         "--name=w", "--rw=randwrite", "--bsrange=512-128k", "--offset=16M", "--size=24M",
         "--name=t", "--rw=randtrim", "--bs=64k", "--offset=40M", "--size=8M"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    cmds = []
    for k in range(2000):
        cmds += ["-c", f"write -q -z {48 * MiB + (k * 37 % 120) * 64 * KiB + (k % 7) * 512} {(k % 5 + 1) * 4096}"]
    qio = subprocess.Popen([tool("qemu-io"), "-f", "raw", *cmds, uri], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    return [fio, qio]


def end_load(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)


def sealed_count(proc) -> int:
    return sum(line.startswith("sealed ") and not line.endswith("(0 bytes)") for line in proc.lines)


def assert_dirty_covers_differences(t: TrackedDisk, replica_image: bytes) -> list[tuple[int, int]]:
    dirty = extents_as_ranges(t.dirty_extents())
    changed = differing(replica_image, t.read(0, SIZE), 512)
    assert changed, "the load changed nothing?"
    assert uncovered(changed, dirty) == [], "regions differ from the replica but are not dirty"
    # the bitmap was kept through the crash: regions no client touched are not dirty
    assert uncovered(dirty, [LOADED]) == [], f"dirty outside the loaded range: {merge(dirty)[:5]}"
    return dirty


def test_kill9_under_load_then_resync(tmp_path):
    path, replica = prepare(tmp_path)
    replica_image = read_vhdx(replica)
    sock = tmp_path / "nbd.sock"
    uri = f"nbd+unix:///disk.vhdx?socket={sock}"
    for round_ in range(2):                     # the second round starts (and dies) in resync-required
        serve = start_serve([path], sock, "--cut-every", "0.2", *NO_SIZE_TRIGGER)
        load = start_load(tmp_path, uri)
        try:
            if round_ == 0:
                assert "disk.vhdx: tracking" in serve.lines
                wait_until(lambda: sealed_count(serve) >= 3, 20, "logs with data to be sealed")
            else:
                assert any("RESYNC REQUIRED" in line for line in serve.lines), serve.lines
                time.sleep(0.8)
            assert load[0].poll() is None, "fio stopped before the kill"      # (qemu-io may be done)
            serve.send_signal(signal.SIGKILL)
            serve.wait(10)
        finally:
            end_load(load)
            stop_serve(serve, signal.SIGKILL)
        assert serve.returncode == -signal.SIGKILL
        st = track_status(path)
        assert st["clean"] is False
        if round_ == 0:
            assert st["state"] == "tracking" and len(st["pending_logs"]) >= 3
            # what was sealed before the crash is a complete, verifiable chain
            for r in open_chain(sealed_log_paths(path), SIZE):
                r.close()
        t = TrackedDisk(path)
        try:
            assert t.resync_required
            assert "not closed cleanly" in t.reason, t.reason
            assert_dirty_covers_differences(t, replica_image)
        finally:
            t.close()
        st = track_status(path)
        assert st["state"] == "resync_required" and "not closed cleanly" in st["reason"]

    t = TrackedDisk(path)
    # the shipper delivers the logs sealed before the crash and the replica acknowledges them: what the
    # resync must compare may shrink to what they hold no more, never below what still differs
    logs = sealed_log_paths(path)
    assert len(logs) >= 3
    with VhdxDisk.open(replica, read_only=False) as rep:
        apply_chain(rep, logs)
    t.acknowledge(uuid.UUID(t.state.sealed_logs[-1].unique_id))
    assert t.state.sealed_logs == [] and t.resync_required
    replica_image = read_vhdx(replica)
    # the resync (for now by hand): exactly the dirty extents, disk -> replica
    dirty = assert_dirty_covers_differences(t, replica_image)
    copied = 0
    with VhdxDisk.open(replica, read_only=False) as rep:
        for off, n in t.dirty_extents():
            rep.write(off, t.read(off, n))
            copied += n
    assert copied < SIZE
    assert sum(b - a for a, b in merge(dirty)) == copied
    t.resync_done()
    t.close()
    assert qemu_compare(path, replica, "vhdx", "vhdx").returncode == 0
    assert track_status(path)["state"] == "tracking"


def test_clean_stop_under_load_leaves_a_complete_chain(tmp_path):
    path, replica = prepare(tmp_path)
    first = len(sealed_log_paths(path))
    sock = tmp_path / "nbd.sock"
    uri = f"nbd+unix:///disk.vhdx?socket={sock}"
    serve = start_serve([path], sock, *NO_SIZE_TRIGGER)
    load = start_load(tmp_path, uri)
    try:
        for _ in range(4):                                    # cuts on demand
            n = sum(line.startswith("sealed ") for line in serve.lines)
            serve.send_signal(signal.SIGUSR1)
            wait_until(lambda: sum(line.startswith("sealed ") for line in serve.lines) > n, 10, "a cut")
            time.sleep(0.25)
        assert load[0].poll() is None, "fio stopped before the stop"
        serve.send_signal(signal.SIGTERM)           # clean stop while the clients still write
        serve.wait(30)
    finally:
        end_load(load)
        stop_serve(serve)
    st = track_status(path)
    assert st["state"] == "tracking" and st["clean"] is True and st["reason"] is None
    logs = sealed_log_paths(path)[first:]
    assert len(logs) >= 5
    with VhdxDisk.open(replica, read_only=False) as rep:
        stats = apply_chain(rep, logs)
    assert stats.writes > 100
    assert qemu_compare(path, replica, "vhdx", "vhdx").returncode == 0
    t = TrackedDisk(path)
    assert not t.resync_required, t.reason
    t.close()

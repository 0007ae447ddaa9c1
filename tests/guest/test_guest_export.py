"""A real Linux guest (qemu-system-x86_64, TCG) whose disk is the project's tracked NBD export of a VHDX.

The guest writes files with random bytes in rounds, fsyncs each, keeps a sha256 manifest, and reports every
failed command and every kernel I/O or ext4 error on its console (tests/guest/image.py). These tests check
what a VM sees: no error while the export cuts its logs, a clean filesystem with every file intact after a
clean shutdown, and no error when the export process is killed with SIGKILL and started again (QEMU's NBD
client waits `reconnect-delay` seconds for it). The last test shows the harness does see errors: an export
that stays away longer than reconnect-delay makes the guest's I/O fail.
"""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from replicator.hrl import apply_chain
from replicator.tracking.service import ExportService
from replicator.vhdx import VhdxDisk

from ..tracking.helpers import copy_file, sealed_log_paths, start_serve, stop_serve, tracked
from .conftest import requires_qemu
from .harness import Guest, GuestError, make_disk_image, verify_image

pytestmark = [requires_qemu, pytest.mark.timeout(300)]

MiB = 1 << 20
FILES = 4             # files per round (the guest's default)
BOOT_TIMEOUT = 180    # TCG on a busy 2-core machine: generous


def log(msg: str) -> None:
    print(f"[test {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def report(g, what: str) -> None:
    """Boot time and round rate, from the guest's own uptime stamps."""
    times = g.round_times()
    up = g.wait_for("GUEST_UP", 1, allow_errors=True)
    if len(times) >= 2:
        (r0, t0), (r1, t1) = times[0], times[-1]
        rate = (r1 - r0) / (t1 - t0) if t1 > t0 else float("inf")
        gaps = [b[1] - a[1] for a, b in zip(times, times[1:])]
        log(f"{what}: GUEST_UP at guest {up.split()[-1]} s, {r1} rounds, "
            f"{rate:.2f} rounds/s between round {r0} and {r1}, longest gap between rounds {max(gaps):.2f} s, "
            f"qemu ran {g.elapsed():.1f} s")


def assert_no_errors(g) -> None:
    errors = g.errors()
    assert errors == [], f"the guest saw errors: {errors}\n{g.tail()}"


def test_guest_writes_through_tracked_export_with_cuts(tmp_path, guest):
    """The guest writes while the export cuts its logs (twice while it runs, once while it is frozen
    through its agent). Then: a clean shutdown, no error, every file intact; and the logs applied to a copy
    of the disk as it was before the guest started give the guest's filesystem as of each cut: with its
    journal replayed at a running cut, clean as it is at the frozen cut, and the whole disk at the end."""
    disk = make_disk_image(tmp_path / "disk.vhdx", 256 * MiB)
    replica = copy_file(disk, tmp_path / "replica.vhdx")    # what a replica holds before the first cycle
    sock = str(tmp_path / "nbd.sock")
    svc = ExportService({"disk.vhdx": tracked(disk)}, socket_path=sock).start()
    cuts = []                                               # (kind, rounds synced before the cut, log path)
    try:
        t0 = time.monotonic()
        guest.start(sock, export="disk.vhdx", files=FILES)
        guest.wait_for("GUEST_MOUNTED", BOOT_TIMEOUT)
        log(f"booted and mounted in {time.monotonic() - t0:.1f} s")

        for _ in range(2):                                   # cuts while the guest writes
            guest.wait_rounds(guest.rounds() + 2, BOOT_TIMEOUT)
            at, t = guest.rounds(), time.monotonic()
            (sealed,) = svc.cut()
            log(f"cut after round {at} in {(time.monotonic() - t) * 1000:.0f} ms: {sealed.data_bytes} bytes")
            cuts.append(("running", at, sealed.path))

        guest.wait_rounds(guest.rounds() + 2, 120)
        with guest.freeze() as frozen:                      # a cut of the quiesced guest
            assert frozen == 1
            assert guest.agent("guest-fsfreeze-status") == "frozen"
            at = guest.rounds()
            (sealed,) = svc.cut()
            cuts.append(("frozen", at, sealed.path))
            time.sleep(1.5)
            assert guest.rounds() <= at + 1, "the guest went on writing while frozen"
        assert guest.agent("guest-fsfreeze-status") == "thawed"

        guest.wait_rounds(max(guest.rounds() + 2, 5), 120)
        took = guest.shutdown()
        report(guest, f"tracked export, {len(cuts)} cuts, shutdown {took:.1f} s")
        assert_no_errors(guest)
        rounds = guest.rounds()
        assert rounds >= 5
    finally:
        svc.stop()

    assert verify_image(disk) == FILES * rounds

    logs = sealed_log_paths(disk)
    assert [c[2] for c in cuts] == logs[:len(cuts)], (cuts, logs)
    done = 0
    for i, (kind, at, path) in enumerate(cuts):
        with VhdxDisk.open(replica, read_only=False) as d:
            apply_chain(d, logs[done:i + 1])
        done = i + 1
        n = verify_image(replica, crash_consistent=(kind == "running"))
        log(f"replica at the {kind} cut after round {at}: {n} files verified")
        assert n >= FILES * at, (kind, at, n)
        if kind == "frozen":
            failover, failover_at = copy_file(replica, tmp_path / "failover.vhdx"), at
    with VhdxDisk.open(replica, read_only=False) as d:
        apply_chain(d, logs[done:])
    same = subprocess.run(["qemu-img", "compare", "-f", "vhdx", "-F", "vhdx", disk, replica], capture_output=True)
    assert same.returncode == 0, same.stdout.decode() + same.stderr.decode()

    # the point taken while the guest was frozen boots: a new guest mounts it and carries on writing
    svc = ExportService({"failover.vhdx": tracked(failover)}, socket_path=sock).start()
    try:
        with Guest(tmp_path / "guest2", image=guest.image) as g2:
            g2.start(sock, export="failover.vhdx", files=FILES)
            mounted = g2.wait_for("GUEST_MOUNTED", BOOT_TIMEOUT)
            first = int(mounted.split("first_round=")[1].split()[0])
            assert first > failover_at, mounted
            g2.wait_rounds(first + 1, 120)
            g2.shutdown()
            assert_no_errors(g2)
            last = g2.rounds()
    finally:
        svc.stop()
    n = verify_image(failover)
    log(f"failover copy booted at round {first}, wrote up to round {last}: {n} files verified")
    assert n >= FILES * last - (FILES - 1)

    # verify_image can fail: a changed file and a missing one in a copy of the image are both caught
    raw = str(tmp_path / "tampered.raw")
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", disk, raw], check=True)
    other = tmp_path / "other"
    other.write_bytes(os.urandom(4096))
    for cmd in ("rm /data/r1_f1", f"write {other} /data/r1_f1", "rm /data/r2_f2"):
        subprocess.run(["debugfs", "-w", "-R", cmd, raw], check=True, capture_output=True)
    with pytest.raises(GuestError) as e:
        verify_image(raw)
    assert "data/r1_f1: sha256" in str(e.value) and "data/r2_f2: missing" in str(e.value), e.value


def test_guest_carries_on_when_export_is_killed_and_restarted(tmp_path, guest):
    disk = make_disk_image(tmp_path / "disk.vhdx", 256 * MiB)
    tracked(disk).close()                                   # tracking state established: initial copy done
    sock = tmp_path / "nbd.sock"
    serve = start_serve([disk], sock)
    try:
        guest.start(sock, export="disk.vhdx", files=FILES, reconnect_delay=60)
        guest.wait_rounds(3, BOOT_TIMEOUT)

        before = guest.rounds()
        serve.kill()                                         # SIGKILL, mid-round
        serve.wait(30)
        killed_at = time.monotonic()
        log(f"export killed -9 at round {before}: {serve.lines}")
        stop_serve(serve, sig=9)
        time.sleep(1)
        serve = start_serve([disk], sock)
        restarted_at = time.monotonic()
        log(f"export restarted {restarted_at - killed_at:.1f} s after the kill: {serve.lines}")
        guest.wait_rounds(before + 2, 120)
        log(f"round {before + 2} done {time.monotonic() - restarted_at:.1f} s after the restart")

        guest.wait_rounds(before + 5, 120)
        log(f"round {before + 5} reached {time.monotonic() - killed_at:.1f} s after the kill")
        (blk,) = [b for b in guest.qmp("query-block") if "/vblk0/" in b.get("qdev", "")]
        assert blk.get("io-status", "ok") == "ok", blk
        took = guest.shutdown()
        report(guest, f"export killed -9 and restarted, shutdown {took:.1f} s")
        assert_no_errors(guest)
        rounds = guest.rounds()
    except BaseException:
        if serve.poll() is None:
            stop_serve(serve, sig=9)          # the test's own failure is the one to report
        raise
    stop_serve(serve)                         # a clean stop: checked
    log(f"restarted export's output: {serve.lines}")
    assert verify_image(disk) == FILES * rounds


def test_harness_sees_io_errors_when_export_stays_away(tmp_path, guest):
    """The other side of the two tests above: with the export gone for longer than reconnect-delay, QEMU
    fails the guest's requests, and the guest's console says so (the harness is able to see a failure)."""
    disk = make_disk_image(tmp_path / "disk.vhdx", 64 * MiB)
    sock = str(tmp_path / "nbd.sock")
    svc = ExportService({"disk.vhdx": tracked(disk)}, socket_path=sock).start()
    try:
        guest.start(sock, export="disk.vhdx", reconnect_delay=2)
        guest.wait_rounds(2, BOOT_TIMEOUT)
    finally:
        svc.stop()
    t = time.monotonic()
    while not guest.errors():                       # the kernel's own console lines come first
        assert guest.running() and time.monotonic() < t + 90, f"no error line\n{guest.tail()}"
        time.sleep(0.2)
    log(f"guest reported errors {time.monotonic() - t:.1f} s after the export stopped: {guest.errors()[:4]}")
    # and the guest's own reports: a failed command, or the kmsg watcher
    guest.wait_for("GUEST_IO_ERROR", 60, allow_errors=True)
    guest.wait_for("GUEST_KERNEL_ERROR", 60, allow_errors=True)

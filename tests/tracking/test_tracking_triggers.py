"""Every resynchronization trigger moves the disk to resync-required with its reason recorded (and shown by
`replicator track status --json`), and no write is ever lost: dirty_extents() covers every region written
since the last log the replica acknowledged, also after more logs are acknowledged in that state."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid

import pytest

from replicator.errors import DiskIOError
from replicator.hrl import HrlWriter
from replicator.tracking import TrackedDisk
from replicator.tracking.tracker import SPARE_LOG
from replicator.vhdx import VhdxDisk

from ..externals import run
from .helpers import (KiB, MiB, differing, extents_as_ranges, make_vhdx, pattern, qemu_io, start_serve, stop_serve,
                      track_status, tracked, uncovered)

SIZE = 32 * MiB
REGION = 256 * KiB


class Story:
    """A tracked disk with history: A written, its log acknowledged (the replica holds A); B sealed in a
    pending log; C written after it (then sealed by a clean stop, unless close=False).

    Every write is recorded with its epoch (the number of logs sealed before it), and every sealed log with
    the disk image at its seal, so that acknowledging a log moves `replica` to that image and forgets the
    writes the log holds."""

    def __init__(self, tmp_path, close: bool = True):
        self.path = make_vhdx(tmp_path / "disk.vhdx", SIZE, fill=[(20 * MiB, pattern(1, 3 * MiB))])
        self.epoch, self.writes, self.sealed = 0, [], {}
        t = tracked(self.path, region_size=REGION)
        self.write(t, 1 * MiB + 100, 5000, seed=2)                                  # A
        log1 = self.cut(t)
        t.acknowledge(log1.unique_id)
        self.acknowledged(log1.unique_id)
        self.write(t, 4 * MiB - 700, 1400, seed=3)                                  # B: crosses a region
        self.zero(t, 20 * MiB + 10 * KiB, 300 * KiB)                                # B: zeroing
        self.log2 = self.cut(t)
        self.write(t, 9 * MiB + 12345, 70 * KiB, seed=4)                            # C
        self.zero(t, 22 * MiB, 64 * KiB, trim=True)                                 # C: trim
        self.t = t
        if close:
            self.close(t)

    # ---- the model
    def write(self, t, off: int, n: int, seed: int) -> None:
        t.write(off, pattern(seed, n))
        self.writes.append((self.epoch, off, off + n))

    def zero(self, t, off: int, n: int, trim: bool = False) -> None:
        (t.trim if trim else t.write_zeroes)(off, n)
        self.writes.append((self.epoch, off, off + n))

    def untracked(self, off: int, n: int) -> None:
        self.writes.append((self.epoch, off, off + n))

    def cut(self, t):
        image = t.read(0, SIZE)
        sealed = t.cut()
        if sealed is not None:
            self._sealed(str(sealed.unique_id), image)
        return sealed

    def close(self, t) -> None:
        image, before = t.read(0, SIZE), len(t.state.sealed_logs)
        t.close()
        if len(t.state.sealed_logs) > before:
            self._sealed(t.state.sealed_logs[-1].unique_id, image)

    def _sealed(self, uid: str, image: bytes) -> None:
        self.sealed[uid] = (self.epoch, image)
        self.epoch += 1

    def acknowledged(self, uid) -> None:
        epoch, self.replica = self.sealed[str(uid)]
        self.writes = [w for w in self.writes if w[0] > epoch]

    def reopen(self, **kw) -> TrackedDisk:
        self.t = TrackedDisk(self.path, region_size=REGION, **kw)
        return self.t

    # ---- the checks
    def assert_nothing_lost(self, t: TrackedDisk) -> None:
        dirty = extents_as_ranges(t.dirty_extents())
        assert uncovered([(a, b) for _, a, b in self.writes], dirty) == [], \
            "a region written since the last acknowledged log is not dirty"
        changed = differing(self.replica, t.read(0, SIZE), 512)
        assert uncovered(changed, dirty) == [], "a region that differs from the replica is not dirty"

    def assert_resync(self, t: TrackedDisk, why: str) -> None:
        assert t.resync_required
        assert why in t.reason, t.reason
        self.assert_nothing_lost(t)
        # still serving writes, and they are tracked
        self.write(t, 30 * MiB + 1, 777, seed=9)
        self.assert_nothing_lost(t)
        t.flush()
        assert t.cut() is None                      # no logs while resync is required
        self.close(t)
        st = track_status(self.path)
        assert st["state"] == "resync_required" and why in st["reason"], st
        # the reason survives a clean stop and reopen, and nothing is forgotten
        t = self.reopen()
        assert t.resync_required and why in t.reason
        self.assert_nothing_lost(t)
        # the shipper acknowledging logs it had shipped must not shrink what the resync compares
        for rec in list(t.state.sealed_logs):
            t.acknowledge(uuid.UUID(rec.unique_id))
            self.acknowledged(rec.unique_id)
            self.assert_nothing_lost(t)
        assert t.resync_required and t.state.sealed_logs == []
        # the resync: copy the dirty extents to the replica, then tracking starts over
        replica = bytearray(self.replica)
        for off, n in t.dirty_extents():
            replica[off:off + n] = t.read(off, n)
        assert bytes(replica) == t.read(0, SIZE)
        t.resync_done()
        assert not t.resync_required and t.dirty_extents() == []
        t.write(0, b"x" * 512)
        assert t.dirty_extents() == [(0, REGION)]
        t.close()
        assert track_status(self.path)["state"] == "tracking"


def test_clean_stop_and_reopen_is_not_a_trigger(tmp_path):
    s = Story(tmp_path)
    t = s.reopen()
    assert not t.resync_required, t.reason
    assert t.state.sealed_logs[0].unique_id == str(s.log2.unique_id)
    s.assert_nothing_lost(t)
    # opening the VHDX read-write elsewhere without writing is not an untracked change either
    t.close()
    with VhdxDisk.open(s.path, read_only=False) as d:
        d.read(0, 4096)
        d.flush()
    run("qemu-io", "-f", "vhdx", "-c", "read 0 64k", s.path)
    t = s.reopen()
    assert not t.resync_required, t.reason
    t.close()
    st = track_status(s.path)
    assert st["state"] == "tracking" and st["reason"] is None and st["clean"] is True


def test_not_closed_cleanly_sigkill(tmp_path):
    s = Story(tmp_path)
    script = textwrap.dedent(f"""
        import os, signal, hashlib
        from replicator.tracking import TrackedDisk
        t = TrackedDisk({s.path!r}, region_size={REGION})
        assert not t.resync_required, t.reason
        t.write({12 * MiB - 3}, hashlib.shake_128(b"D").digest(10))
        t.write_zeroes({14 * MiB + 512}, {3 * REGION})
        t.write({16 * MiB}, b"E" * 4096, fua=True)
        print("written", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()
    assert b"written" in p.stdout
    for off, n in ((12 * MiB - 3, 10), (14 * MiB + 512, 3 * REGION), (16 * MiB, 4096)):
        s.untracked(off, n)                       # tracked by the killed process: no log of ours has them
    st = track_status(s.path)
    assert st["clean"] is False                   # the killed tracker never recorded a clean stop
    t = s.reopen()
    s.assert_resync(t, "not closed cleanly")


def test_not_closed_cleanly_abandoned_in_process(tmp_path):
    """The same without a subprocess: the tracker is dropped without close() (its process 'dies')."""
    s = Story(tmp_path, close=False)
    dead = s.t
    s.write(dead, 7 * MiB, 9000, seed=5)
    dead.sidecar.close()
    dead.log.close()
    dead.disk.io.close()                          # the file descriptors go away; nothing else runs
    t = s.reopen()
    s.assert_resync(t, "not closed cleanly")


@pytest.mark.parametrize("damage", ["delete", "corrupt-header", "truncate", "swap"])
def test_broken_chain(tmp_path, damage):
    s = Story(tmp_path)
    log2 = s.log2.path
    if damage == "delete":
        os.unlink(log2)
    elif damage == "corrupt-header":
        with open(log2, "r+b") as f:
            f.seek(100)
            f.write(b"\xff" * 16)
    elif damage == "truncate":
        with open(log2, "r+b") as f:
            f.truncate(os.path.getsize(log2) // 2)
    else:                                         # a valid sealed log, but not the one the chain expects
        os.unlink(log2)
        w = HrlWriter(log2)
        w.append(0, b"z" * 512)
        w.seal()
    t = s.reopen()
    s.assert_resync(t, "broken chain")


@pytest.mark.parametrize("writer", ["vhdxdisk", "qemu-io"])
def test_data_write_guid_changed_while_not_tracked(tmp_path, writer):
    s = Story(tmp_path)
    if writer == "vhdxdisk":
        with VhdxDisk.open(s.path, read_only=False) as d:
            d.write(27 * MiB + 1, b"untracked")
        s.untracked(27 * MiB + 1, 9)
    else:
        run("qemu-io", "-f", "vhdx", "-c", "write -P 0x66 25M 4k", s.path)
        s.untracked(25 * MiB, 4096)
    t = s.reopen()
    s.assert_resync(t, "changed while not tracked")


def test_log_larger_than_its_share(tmp_path):
    s = Story(tmp_path)
    t = s.reopen(max_log_share=0.01)              # 1% of 32 MiB: about 328 KiB of log data
    assert not t.resync_required
    s.write(t, 2 * MiB, 200 * KiB, seed=6)
    assert not t.resync_required
    s.zero(t, 5 * MiB, 4 * MiB)                   # zeroes cost the log no data
    assert not t.resync_required
    s.write(t, 2 * MiB + 200 * KiB, 200 * KiB, seed=7)
    s.assert_resync(t, "grew past 1%")


def test_log_share_through_the_cli_option(tmp_path):
    """`track serve --max-log-share` reaches the tracker: a 1 MiB write on a 32 MiB disk with 0.01."""
    s = Story(tmp_path)
    sock = str(tmp_path / "nbd.sock")
    proc = start_serve([s.path], sock, "--max-log-share", "0.01")
    try:
        qemu_io(f"nbd+unix:///disk.vhdx?socket={sock}", "write -P 0x21 3M 1M")
        s.untracked(3 * MiB, MiB)
    finally:
        stop_serve(proc)
    t = s.reopen()
    s.assert_resync(t, "grew past 1%")


@pytest.mark.parametrize("failing", ["append", "commit", "create", "seal"])
def test_failed_log_write(tmp_path, monkeypatch, failing):
    s = Story(tmp_path)
    t = s.reopen()
    assert not t.resync_required

    def broken(*a, **kw):
        raise DiskIOError("logs/00000009.hrl: log write failed: No space left on device")
    target = "__init__" if failing == "create" else failing
    monkeypatch.setattr(HrlWriter, target, broken)
    s.write(t, 11 * MiB + 3, 5000, seed=8)        # the disk write itself succeeds
    assert t.read(11 * MiB + 3, 5000) == pattern(8, 5000)
    t.flush()
    sealed = s.cut(t)                             # the failure surfaces at the latest at the cut
    if failing == "create":                       # the old log sealed fine; its successor could not start
        assert sealed is not None and os.path.exists(sealed.path)
    else:
        assert sealed is None
    assert t.resync_required, f"a failing HrlWriter.{target} went unnoticed"
    monkeypatch.undo()
    s.assert_resync(t, "log write failed")


@pytest.mark.parametrize("how", ["log-share", "sigkill-like", "tracking"])
def test_resync_done_leaves_no_stale_logs(tmp_path, how):
    path = make_vhdx(tmp_path / "disk.vhdx", SIZE)
    logs_dir = path + ".rpl/logs"
    t = tracked(path, region_size=REGION, max_log_share=0.05)
    if how == "log-share":
        t.write(0, pattern(5, 2 * MiB))                 # > 5% of 32 MiB: the active log is cut off, unsealed
        assert t.resync_required
    elif how == "sigkill-like":
        t.write(0, pattern(5, MiB))
        t.sidecar.close()
        t.log.close()
        t.disk.io.close()
        t = TrackedDisk(path, region_size=REGION)
        assert t.resync_required
    else:
        t.write(0, pattern(5, MiB))                     # tracking: the active log holds data
    t.resync_done()
    left = sorted(n for n in os.listdir(logs_dir) if n != SPARE_LOG)     # the spare is a file, not a log
    assert left == [t.state.active_log], "logs from before the resync are left behind"
    t.close()

"""Log recycling in the tracker: an acknowledged log's file becomes the spare (spare.hrl, cut to RECYCLE_MAX),
the next cut's new log is written over it (the same inode), and every sealed log -- recycled or not --
replays onto the replica to exactly the disk as of its cut."""
from __future__ import annotations

import os

import pytest

from replicator.hrl import HrlReader, apply_chain
from replicator.tracking import tracker as tracker_mod
from replicator.tracking.tracker import SPARE_LOG
from replicator.vhdx import VhdxDisk

from .helpers import KiB, MiB, copy_file, make_vhdx, pattern, read_vhdx, tracked

SIZE = 32 * MiB
REGION = 256 * KiB


class Replica:
    """The replica side: each sealed log is applied (as the shipper does) and must give the disk as of its
    cut; then it is acknowledged."""

    def __init__(self, tmp_path, path):
        self.path = copy_file(path, tmp_path / "replica.vhdx")

    def ship(self, t, sealed, image: bytes) -> None:
        with HrlReader(sealed.path, SIZE) as r:
            assert os.path.getsize(sealed.path) == r.header.eol_location, "the sealed log is not exactly its bytes"
        with VhdxDisk.open(self.path, read_only=False) as rep:
            apply_chain(rep, [sealed.path])
        assert read_vhdx(self.path) == image, f"{sealed.path} does not replay to the disk as of its cut"
        t.acknowledge(sealed.unique_id)


def start(tmp_path):
    path = make_vhdx(tmp_path / "disk.vhdx", SIZE, fill=[(0, pattern(1, 4 * MiB)), (20 * MiB, pattern(2, 2 * MiB))])
    replica = Replica(tmp_path, path)            # the disk's content before tracking starts
    t = tracked(path, region_size=REGION)
    return path, replica, t, t.sidecar.logs_dir


def cut(t):
    image = t.read(0, SIZE)
    sealed = t.cut()
    assert sealed is not None, t.reason
    return sealed, image


def test_acknowledged_log_becomes_the_spare_and_the_next_log_reuses_it(tmp_path):
    path, replica, t, logs = start(tmp_path)
    t.write(1 * MiB + 100, pattern(3, 3 * MiB))                   # a big first log
    t.write(21 * MiB, pattern(4, 5000))
    log1, image = cut(t)
    log1_ino, log1_size = os.stat(log1.path).st_ino, os.path.getsize(log1.path)
    replica.ship(t, log1, image)
    assert sorted(os.listdir(logs)) == sorted([SPARE_LOG, t.state.active_log])
    spare = os.path.join(logs, SPARE_LOG)
    assert os.stat(spare).st_ino == log1_ino and os.path.getsize(spare) == log1_size
    assert not os.path.exists(log1.path)

    # the log active at the acknowledgement was created before the spare existed; the next one takes it
    t.write(5 * MiB, pattern(5, 64 * KiB))
    log2, image = cut(t)
    active = os.path.join(logs, t.state.active_log)
    assert os.stat(active).st_ino == log1_ino, "the new log did not reuse the spare's file"
    assert not os.path.exists(spare)
    assert sorted(os.listdir(logs)) == sorted([os.path.basename(log2.path), t.state.active_log])

    # the recycled log, much smaller than the file it reuses, holds only its own writes
    t.write(3 * MiB - 700, pattern(6, 1400))                       # crosses a region
    t.write(30 * MiB + 3, pattern(7, 10 * KiB))
    t.write(1 * MiB + 100, pattern(8, 512))                        # over log1's data
    log3, image3 = cut(t)
    assert os.stat(log3.path).st_ino == log1_ino
    assert os.path.getsize(log3.path) < log1_size
    with HrlReader(log3.path, SIZE) as r:
        assert [(w.offset, w.length) for w in r.writes] == [(3 * MiB - 700, 1400), (30 * MiB + 3, 10 * KiB),
                                                            (1 * MiB + 100, 512)]
        assert [r.read_data(w) for w in r.writes] == [pattern(6, 1400), pattern(7, 10 * KiB), pattern(8, 512)]
    replica.ship(t, log2, image)
    replica.ship(t, log3, image3)
    # log2 and log3 acknowledged: the newer (log3, the recycled file) is the spare, log2 is gone
    assert sorted(os.listdir(logs)) == sorted([SPARE_LOG, t.state.active_log])
    assert os.stat(spare).st_ino == log1_ino
    assert not os.path.exists(log2.path) and not os.path.exists(log3.path)

    # and through a clean stop and reopen the spare goes on being used
    t.write(9 * MiB, pattern(9, 300 * KiB))
    t.close()
    t = tracked(path, region_size=REGION)
    assert not t.resync_required, t.reason
    sealed = [os.path.join(logs, rec.name) for rec in t.state.sealed_logs]
    assert os.stat(os.path.join(logs, t.state.active_log)).st_ino == log1_ino
    with VhdxDisk.open(replica.path, read_only=False) as rep:
        apply_chain(rep, sealed)
    assert read_vhdx(replica.path) == t.read(0, SIZE)
    t.close()


def test_spare_larger_than_recycle_max_is_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(tracker_mod, "RECYCLE_MAX", 1 * MiB)
    path, replica, t, logs = start(tmp_path)
    t.write(0, pattern(10, 3 * MiB))
    log1, image = cut(t)
    assert os.path.getsize(log1.path) > 3 * MiB
    replica.ship(t, log1, image)
    spare = os.path.join(logs, SPARE_LOG)
    assert os.path.getsize(spare) == 1 * MiB
    # a cut spare is still a fine file to write the next log over
    t.write(2 * MiB, pattern(11, 2 * MiB))
    log2, _ = cut(t)
    t.write(12 * MiB, pattern(12, 1500 * KiB))                     # log3 is larger than the cut spare
    log3, image3 = cut(t)
    assert os.path.getsize(log3.path) > 1 * MiB
    with HrlReader(log3.path, SIZE) as r:
        assert os.path.getsize(log3.path) == r.header.eol_location
    replica.ship(t, log2, _)
    replica.ship(t, log3, image3)
    assert os.path.getsize(spare) == 1 * MiB
    t.close()


def test_spare_not_larger_than_recycle_max_is_kept_whole(tmp_path):
    path, replica, t, logs = start(tmp_path)
    t.write(0, pattern(13, 2 * MiB))
    log1, image = cut(t)
    size = os.path.getsize(log1.path)
    replica.ship(t, log1, image)
    assert size < tracker_mod.RECYCLE_MAX
    assert os.path.getsize(os.path.join(logs, SPARE_LOG)) == size
    t.close()


def test_acknowledging_several_logs_keeps_only_the_newest_as_spare(tmp_path):
    path, replica, t, logs = start(tmp_path)
    sealed = []
    for k in range(3):
        t.write(k * 2 * MiB, pattern(20 + k, (k + 1) * 300 * KiB))
        sealed.append(cut(t))
    newest_ino = os.stat(sealed[-1][0].path).st_ino
    with VhdxDisk.open(replica.path, read_only=False) as rep:
        apply_chain(rep, [s.path for s, _ in sealed])
    assert read_vhdx(replica.path) == sealed[-1][1]
    t.acknowledge(sealed[-1][0].unique_id)                          # all three at once
    assert sorted(os.listdir(logs)) == sorted([SPARE_LOG, t.state.active_log])
    assert os.stat(os.path.join(logs, SPARE_LOG)).st_ino == newest_ino
    t.close()


def test_begin_resync_recycles_older_logs_and_keeps_the_spare(tmp_path):
    path, replica, t, logs = start(tmp_path)
    t.write(0, pattern(30, 600 * KiB))
    log1, image = cut(t)
    replica.ship(t, log1, image)                                    # log1's file is the spare
    t.write(MiB, pattern(31, 100 * KiB))
    log2, _ = cut(t)                                                # log3 (active) is log1's file
    t.write(2 * MiB, pattern(32, 100 * KiB))
    log3_ino = os.stat(os.path.join(logs, t.state.active_log)).st_ino
    t.replica_diverged("test: the replica changed")
    assert t.resync_required
    t.begin_resync()
    # the new chain's log is a fresh file (no spare was there); the older logs' newest is the spare
    names = sorted(os.listdir(logs))
    assert names == sorted([SPARE_LOG, t.state.active_log]), names
    assert os.stat(os.path.join(logs, SPARE_LOG)).st_ino == log3_ino
    t.end_resync()
    t.close()


def test_zeroing_logged_into_a_recycled_log_replays(tmp_path):
    path, replica, t, logs = start(tmp_path)
    t.write(0, pattern(40, 3 * MiB))                              # log1: 3 MiB of non-zero data
    log1, image = cut(t)
    replica.ship(t, log1, image)
    t.write(8 * MiB, pattern(41, 4096))
    log2, image2 = cut(t)                                          # log3 takes log1's file
    replica.ship(t, log2, image2)
    t.write(10 * MiB, pattern(42, 4096))
    t.write_zeroes(0, 512 * KiB)                                   # its data area lies over log1's data
    t.trim(20 * MiB, 256 * KiB)
    log3, image3 = cut(t)
    replica.ship(t, log3, image3)
    t.close()

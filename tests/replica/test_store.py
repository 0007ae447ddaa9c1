"""Replica store: cycles applied exactly, recovery points rebuilt byte for byte, failovers, faults."""
from __future__ import annotations

import io
import random
import uuid

import pytest

from replicator import delta
from replicator.errors import DiskIOError, FormatError
from replicator.replica import ReplicaStore, SequenceError
from replicator.vhdx import VhdxDisk

from ..externals import qemu_compare

MiB = 1 << 20
SIZE = 16 * MiB
DISK_ID = uuid.UUID("11111111-2222-3333-4444-555555555555")
HOUR = 3600.0


class Primary:
    """A primary disk as bytes, producing delta streams of its changes."""

    def __init__(self, seed: int = 1):
        self.data = bytearray(SIZE)
        self.rng = random.Random(seed)
        self.generation = 0

    def cycle(self, t: float, n_writes: int = 6, consistency: str = "crash", full: bool = False) -> bytes:
        changes = []
        for _ in range(n_writes):
            off = self.rng.randrange(0, SIZE - 300000)
            n = self.rng.randrange(1, 300000)
            if self.rng.random() < 0.2:
                self.data[off:off + n] = bytes(n)
                changes.append((off, n, None))
            else:
                chunk = self.rng.randbytes(n // 2) + bytes(n - n // 2)
                self.data[off:off + n] = chunk
                changes.append((off, n, chunk))
        header = delta.StreamHeader(disk_id=DISK_ID, disk_size=SIZE, block_size=MiB,
                                    generation=self.generation + 1, base_generation=self.generation,
                                    consistency=consistency, source_logs=[], created=t,
                                    kind="full" if full else "delta", extra={})
        sink = io.BytesIO()
        enc = delta.DeltaEncoder(header, sink)
        for off, n, chunk in changes:
            if chunk is None:
                enc.add_zero(off, n)
            else:
                enc.add_data(off, chunk)
        enc.finish()
        self.generation += 1
        return sink.getvalue()


def upload(rd, stream: bytes, stream_id: str | None = None):
    sid = stream_id or uuid.uuid4().hex
    up = rd.open_upload(sid)
    up.write(0, stream)
    up.sync()
    up.close()
    return rd.commit(sid)


def replica_bytes(rd) -> bytes:
    with rd.open_image() as d:
        return d.read(0, d.size)


@pytest.fixture
def store(tmp_path):
    return ReplicaStore(str(tmp_path / "root"))


def test_every_cycle_leaves_the_replica_equal_to_the_primary(store):
    rd = store.ensure_disk(DISK_ID, SIZE, name="disk0")
    p = Primary()
    for k in range(6):
        point = upload(rd, p.cycle(t=1000 + 30 * k))
        assert point.generation == k + 1
        assert replica_bytes(rd) == bytes(p.data)
    assert rd.generation == 6


def test_hourly_points_materialize_byte_identical(store, tmp_path):
    rd = store.ensure_disk(DISK_ID, SIZE)
    rd.set_retention(3)
    p = Primary(seed=7)
    snapshots = {}
    t = 10 * HOUR
    for k in range(14):                      # cycles every 20 minutes (time-compressed): ~4.5 hours
        upload(rd, p.cycle(t=t))
        snapshots[p.generation] = bytes(p.data)
        t += 1200
    kept = rd.points
    assert len(kept) == 4                   # latest + 3 hourly
    assert len({int(x.time // HOUR) for x in kept[:-1]}) == 3
    for point in kept:
        out = str(tmp_path / f"p{point.generation}.vhdx")
        rd.materialize(point.generation, out)
        with VhdxDisk.open(out) as d:
            assert d.read(0, SIZE) == snapshots[point.generation], f"point {point.generation}"
        shadow = str(tmp_path / f"p{point.generation}.raw")
        open(shadow, "wb").write(snapshots[point.generation])
        assert qemu_compare(out, shadow).returncode == 0


def test_test_failover_leaves_replica_untouched_and_replication_continues(store):
    rd = store.ensure_disk(DISK_ID, SIZE)
    rd.set_retention(2)
    p = Primary(seed=3)
    snaps = {}
    for k, t in enumerate((0, HOUR, 2 * HOUR)):
        upload(rd, p.cycle(t=t))
        snaps[p.generation] = bytes(p.data)
    target = rd.points[0].generation
    test = rd.test_failover(target)
    with VhdxDisk.open(test) as d:
        assert d.read(0, SIZE) == snaps[target]
    upload(rd, p.cycle(t=3 * HOUR))        # replication goes on while the test runs
    assert replica_bytes(rd) == bytes(p.data)
    with VhdxDisk.open(test, read_only=False) as d:      # the test VM writes to its own disk
        d.write(0, b"test vm")
    assert replica_bytes(rd) == bytes(p.data)
    rd.cleanup_test_failover(test)
    upload(rd, p.cycle(t=4 * HOUR))
    assert replica_bytes(rd) == bytes(p.data)


def test_out_of_sequence_replayed_and_foreign_streams_are_refused(store):
    rd = store.ensure_disk(DISK_ID, SIZE)
    p = Primary()
    first, second = p.cycle(t=1), p.cycle(t=2)
    with pytest.raises(SequenceError, match="generation"):
        upload(rd, second)                        # skips a cycle
    upload(rd, first)
    good = replica_bytes(rd)
    with pytest.raises(SequenceError):
        upload(rd, first)                         # applied twice
    foreign = delta.StreamHeader(disk_id=uuid.uuid4(), disk_size=SIZE, block_size=MiB, generation=2,
                                 base_generation=1, consistency="crash", source_logs=[], created=3.0,
                                 kind="delta", extra={})
    sink = io.BytesIO()
    enc = delta.DeltaEncoder(foreign, sink)
    enc.add_data(0, b"not this disk" * 100)
    enc.finish()
    with pytest.raises(SequenceError, match="for disk"):
        upload(rd, sink.getvalue())                # a stream of another disk
    assert replica_bytes(rd) == good
    assert rd.state.counters["rejected_streams"] == 3
    upload(rd, second)
    assert replica_bytes(rd) == bytes(p.data)


def test_corrupt_stream_is_refused_and_replica_stays_at_last_good_point(store):
    rd = store.ensure_disk(DISK_ID, SIZE)
    p = Primary()
    upload(rd, p.cycle(t=1))
    good = replica_bytes(rd)
    bad = bytearray(p.cycle(t=2))
    bad[len(bad) // 2] ^= 0x10
    with pytest.raises(FormatError):
        upload(rd, bytes(bad))
    assert replica_bytes(rd) == good and rd.generation == 1


class Crash(Exception):
    pass


@pytest.mark.parametrize("phase", ["undo", "apply"])
def test_crash_during_apply_is_completed_on_restart(store, monkeypatch, phase):
    rd = store.ensure_disk(DISK_ID, SIZE)
    if phase == "undo":
        rd.set_retention(1)              # undo logs are only captured when earlier points are kept
    p = Primary()
    upload(rd, p.cycle(t=1))
    stream = p.cycle(t=2)
    target = "replicator.replica.undo.capture" if phase == "undo" else "replicator.delta.apply_stream"
    real = {"undo": __import__("replicator.replica.undo", fromlist=["capture"]).capture,
            "apply": delta.apply_stream}[phase]

    def crash_midway(*args, **kw):
        if phase == "apply":             # write some of the frames, then die
            src, disk = args
            dec = delta.DeltaDecoder(src)
            for i, fr in enumerate(dec):
                if i == 1:
                    raise Crash()
                if fr.data is None:
                    disk.write_zeroes(fr.offset, fr.length)
                else:
                    disk.write(fr.offset, fr.data)
        raise Crash()

    monkeypatch.setattr(target, crash_midway)
    sid = uuid.uuid4().hex
    up = rd.open_upload(sid)
    up.write(0, stream)
    up.sync()
    up.close()
    with pytest.raises(Crash):
        rd.commit(sid)
    monkeypatch.setattr(target, real)
    reopened = ReplicaStore(store.root).disk(DISK_ID)     # a restarted replica finishes the cycle
    assert reopened.generation == 2 and reopened.state.journal is None
    assert replica_bytes(reopened) == bytes(p.data)


def fail_third_write(monkeypatch):
    """The replica image's third write fails as on a full disk; returns the real VhdxDisk.write. The
    apply takes the Python path, whose writes can be counted (a real full volume under the native apply:
    tests/hardening/test_disk_full.py)."""
    monkeypatch.setattr(VhdxDisk, "planned_write_fds", lambda self: None)
    real_write = VhdxDisk.write
    calls = {"n": 0}

    def full(self, offset, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise DiskIOError("replica.vhdx: pwrite: disk full")
        return real_write(self, offset, data)

    monkeypatch.setattr(VhdxDisk, "write", full)
    return real_write


def test_disk_full_while_applying_rolls_back(store, monkeypatch):
    rd = store.ensure_disk(DISK_ID, SIZE)
    rd.set_retention(1)
    p = Primary()
    upload(rd, p.cycle(t=1))
    good = replica_bytes(rd)
    real_write = fail_third_write(monkeypatch)
    with pytest.raises(DiskIOError):
        upload(rd, p.cycle(t=2, n_writes=8))
    monkeypatch.setattr(VhdxDisk, "write", real_write)
    assert replica_bytes(rd) == good and rd.generation == 1
    assert rd.state.counters["failed_applies"] == 1


def test_disk_full_while_applying_without_undo_is_finished_later(store, monkeypatch):
    """No earlier points kept: no undo log, so a stopped apply stays journaled with its spool and is
    completed (redo) before the disk is read or the next cycle commits; never exposed half-applied."""
    rd = store.ensure_disk(DISK_ID, SIZE)
    p = Primary()
    upload(rd, p.cycle(t=1))
    real_write = fail_third_write(monkeypatch)
    with pytest.raises(DiskIOError):
        upload(rd, p.cycle(t=2, n_writes=8))
    monkeypatch.setattr(VhdxDisk, "write", real_write)
    assert rd.generation == 1 and rd.state.journal["phase"] == "apply"
    assert rd.state.counters["failed_applies"] == 1
    after_two = bytes(p.data)
    upload(rd, p.cycle(t=3))                       # the next cycle finishes the stopped one first
    assert rd.generation == 3 and rd.state.journal is None
    assert replica_bytes(rd) == bytes(p.data)
    assert [pt.generation for pt in rd.points] == [3]
    assert after_two != bytes(p.data)


def test_resumed_upload_continues_from_the_durable_length(store):
    rd = store.ensure_disk(DISK_ID, SIZE)
    p = Primary()
    stream = p.cycle(t=1)
    sid = uuid.uuid4().hex
    up = rd.open_upload(sid)
    up.write(0, stream[:1000])
    up.sync()
    up.close()
    again = rd.open_upload(sid)
    assert again.durable == 1000
    from replicator.kernels import xxh3_128
    assert again.prefix_digest() == xxh3_128(stream[:1000])
    with pytest.raises(SequenceError):
        again.write(500, stream[500:])
    again.write(1000, stream[1000:])
    again.sync()
    again.close()
    rd.commit(sid)
    assert replica_bytes(rd) == bytes(p.data)


def test_a_repeated_commit_is_answered_without_applying_twice(store):
    """The sender lost the reply to its commit and asks again: the same point, applied once."""
    rd = store.ensure_disk(DISK_ID, SIZE)
    p = Primary()
    sid = uuid.uuid4().hex
    first = upload(rd, p.cycle(t=1), stream_id=sid)
    again = rd.commit(sid)
    assert again.generation == first.generation == rd.generation == 1
    assert len(rd.points) == 1
    assert replica_bytes(rd) == bytes(p.data)


def test_a_store_sees_what_another_process_committed(store, tmp_path):
    """A running server's store and an offline seed import (or `replicator points`) in another process:
    the server must read the disk's new state, never keep (and later write back) its stale copy."""
    import subprocess
    import sys
    rd = store.ensure_disk(DISK_ID, SIZE)
    p = Primary(seed=9)
    stream = p.cycle(t=1)
    path = tmp_path / "c1.delta"
    path.write_bytes(stream)
    code = ("import sys; from replicator.replica import ReplicaStore\n"
            "d = ReplicaStore(sys.argv[1]).disk(sys.argv[2]); up = d.open_upload('c1')\n"
            "up.write(0, open(sys.argv[3], 'rb').read()); up.sync(); up.close(); d.commit('c1')\n")
    subprocess.run([sys.executable, "-c", code, store.root, str(DISK_ID), str(path)], check=True)
    assert rd.generation == 0                         # the old object is stale ...
    fresh = store.disk(DISK_ID)                       # ... and the store hands out the new state
    assert fresh is not rd and fresh.generation == 1 and replica_bytes(fresh) == bytes(p.data)
    upload(fresh, p.cycle(t=2))
    assert store.disk(DISK_ID) is fresh and fresh.generation == 2

"""Prechecks: a cycle verified (and its undo log captured) while it arrives is applied from that work,
and only while everything it relied on still holds; otherwise commit checks it again itself."""
from __future__ import annotations

import os
import uuid

import pytest

from replicator.errors import FormatError

from .test_store import DISK_ID, SIZE, Primary, replica_bytes, store, upload  # noqa: F401 (fixture)


def arrive(rd, stream: bytes, piece: int = 7777, sid: str | None = None):
    """Spool a stream piece by piece as the server does, with its precheck following; keep the result."""
    sid = sid or uuid.uuid4().hex
    up = rd.open_upload(sid)
    check = rd.precheck(sid, up)
    for i in range(0, len(stream), piece):
        up.write(up.size, stream[i:i + piece])
        check.grew(up.size)
    up.sync()
    up.close()
    result = check.finish()
    rd.keep_precheck(result)
    return sid, result


@pytest.mark.parametrize("additional_points", [0, 3])
def test_a_prechecked_cycle_is_applied_from_the_precheck(store, additional_points):
    rd = store.ensure_disk(DISK_ID, SIZE)
    rd.set_retention(additional_points)
    p = Primary(seed=3)
    upload(rd, p.cycle(t=1))
    before = bytes(p.data)
    sid, result = arrive(rd, p.cycle(t=3602, n_writes=12))   # the next hour: point 1 stays
    assert result is not None and result.generation == 1 and result.ranges
    if additional_points:                            # the undo log was captured while the stream arrived
        pending = os.stat(result.undo_path)
        assert result.undo_path.endswith(".pending")
    else:
        assert result.undo_path is None
    point = rd.commit(sid)
    assert point.generation == 2 and replica_bytes(rd) == bytes(p.data)
    if additional_points:                            # commit renamed that very file into place
        kept = os.stat(os.path.join(rd.path, "undo", point.undo))
        assert (kept.st_ino, kept.st_size) == (pending.st_ino, pending.st_size)
        test = rd.test_failover(1)                   # and it rewinds to the previous point exactly
        with __import__("replicator.vhdx", fromlist=["VhdxDisk"]).VhdxDisk.open(test) as d:
            assert d.read(0, d.size) == before
    assert not [n for n in os.listdir(os.path.join(rd.path, "undo")) if n.endswith(".pending")]


def test_a_precheck_overtaken_by_another_commit_is_not_used(store):
    rd = store.ensure_disk(DISK_ID, SIZE)
    rd.set_retention(2)
    p = Primary(seed=4)
    upload(rd, p.cycle(t=1))
    s2 = p.cycle(t=2)
    sid, result = arrive(rd, s2)
    assert result is not None
    rd.state.generation, saved = 99, rd.state.generation      # as if the replica had moved on meanwhile
    assert rd._usable_precheck(sid, rd.spool_path(sid)) is None
    assert not os.path.exists(result.undo_path)                # its undo log was thrown away
    rd.state.generation = saved
    assert rd.commit(sid).generation == 2                      # commit verified and captured it itself
    assert replica_bytes(rd) == bytes(p.data)


def test_a_stream_that_does_not_apply_next_gets_no_precheck(store):
    rd = store.ensure_disk(DISK_ID, SIZE)
    p = Primary(seed=5)
    s1, s2 = p.cycle(t=1), p.cycle(t=2)
    sid2, result = arrive(rd, s2)                # generation 1 -> 2 while the replica holds 0
    assert result is None
    upload(rd, s1)
    assert rd.commit(sid2).generation == 2 and replica_bytes(rd) == bytes(p.data)


def test_a_corrupt_stream_gets_no_precheck_and_commit_refuses_it(store):
    rd = store.ensure_disk(DISK_ID, SIZE)
    p = Primary(seed=6)
    upload(rd, p.cycle(t=1))
    good = replica_bytes(rd)
    bad = bytearray(p.cycle(t=2))
    bad[len(bad) // 2] ^= 0x40
    sid, result = arrive(rd, bytes(bad))
    assert result is None
    with pytest.raises(FormatError):
        rd.commit(sid)
    assert rd.generation == 1 and replica_bytes(rd) == good


def test_a_partial_upload_gets_no_precheck(store):
    rd = store.ensure_disk(DISK_ID, SIZE)
    p = Primary(seed=7)
    upload(rd, p.cycle(t=1))
    stream = p.cycle(t=2)
    sid, result = arrive(rd, stream[:len(stream) // 2])
    assert result is None
    up = rd.open_upload(sid)                     # the sender resumes: no precheck from the middle
    assert rd.precheck(sid, up) is None
    up.write(up.size, stream[len(stream) // 2:])
    up.sync()
    up.close()
    assert rd.commit(sid).generation == 2 and replica_bytes(rd) == bytes(p.data)


def test_pending_undo_logs_of_an_earlier_process_are_removed(store):
    rd = store.ensure_disk(DISK_ID, SIZE)
    stale = os.path.join(rd.path, "undo", "ab" * 16 + ".pending")
    with open(stale, "wb") as f:
        f.write(b"x")
    type(store)(store.root).disk(DISK_ID)       # another open while this one has the disk: not its business
    assert os.path.exists(stale)
    rd.close()                                   # the earlier process is gone
    type(store)(store.root).disk(DISK_ID)
    assert not os.path.exists(stale)


def test_the_next_upload_reuses_the_spent_spool_file(store):
    rd = store.ensure_disk(DISK_ID, SIZE)
    p = Primary(seed=8)
    upload(rd, p.cycle(t=1, n_writes=20))
    spent = os.path.join(rd.path, "spool", "spent.bin")
    inode, old_size = os.stat(spent).st_ino, os.path.getsize(spent)
    stream = p.cycle(t=2, n_writes=2)
    assert len(stream) < old_size
    sid = uuid.uuid4().hex
    up = rd.open_upload(sid)
    assert (up.size, os.fstat(up.fd).st_ino) == (0, inode) and not os.path.exists(spent)
    up.write(0, stream[:100])                      # a resumed upload must see only what was written
    up.sync()
    up.close()
    again = rd.open_upload(sid)
    assert again.size == again.durable == 100
    again.write(100, stream[100:])
    again.sync()
    again.close()
    assert rd.commit(sid).generation == 2 and replica_bytes(rd) == bytes(p.data)

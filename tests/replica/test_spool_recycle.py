"""The replica's spool written over in place: a new upload reuses the last applied spool's file (and its
cached pages) and cuts the old bytes past its end when it closes; a crash before that cut makes the
upload start over from byte 0, never resume onto old bytes."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import uuid

import pytest

from replicator.errors import DiskIOError, SequenceError
from replicator.kernels import xxh3_128
from replicator.replica import ReplicaStore
from replicator.replica import store as store_mod

from .test_store import DISK_ID, SIZE, Primary, replica_bytes, upload


def _spent(rd) -> str:
    return os.path.join(rd.path, "spool", store_mod.SPENT_SPOOL)


def _marked(path: str) -> bool:
    try:
        os.getxattr(path, store_mod.STALE_MARK)
        return True
    except OSError:
        return False


def _finish(rd, up, sid: str, stream: bytes) -> None:
    """Write the whole stream into an open upload, close it and commit it."""
    up.write(0, stream)
    up.sync()
    up.close()
    rd.commit(sid)


def _second_upload_written(tmp_path, seed: int):
    """A disk with one cycle applied (spool/spent.bin left behind) and a second cycle's stream written
    and synced into a new upload over it, not closed: (disk, primary, stream, stream id, upload)."""
    rd = ReplicaStore(str(tmp_path / "root")).ensure_disk(DISK_ID, SIZE)
    p = Primary(seed=seed)
    upload(rd, p.cycle(t=1, n_writes=12))
    stream = p.cycle(t=2, n_writes=2)
    sid = uuid.uuid4().hex
    up = rd.open_upload(sid)
    up.write(0, stream)
    up.sync()
    return rd, p, stream, sid, up


def test_a_new_upload_writes_over_the_spent_spool_and_cuts_it_at_close(tmp_path):
    rd = ReplicaStore(str(tmp_path / "root")).ensure_disk(DISK_ID, SIZE)
    p = Primary(seed=3)
    upload(rd, p.cycle(t=1, n_writes=12))           # leaves spool/spent.bin, the first stream
    spent = _spent(rd)
    old_size, old_inode = os.path.getsize(spent), os.stat(spent).st_ino
    second = p.cycle(t=2, n_writes=2)
    assert len(second) < old_size
    sid = uuid.uuid4().hex
    up = rd.open_upload(sid)
    path = rd.spool_path(sid)
    assert os.stat(path).st_ino == old_inode and not os.path.exists(spent)
    assert up.size == up.durable == 0                # the old bytes are not the upload's ...
    assert os.path.getsize(path) == old_size and _marked(path)    # ... but not cut yet
    up.write(0, second)
    up.sync()
    up.close()
    assert os.path.getsize(path) == len(second) and not _marked(path)
    again = rd.open_upload(sid)                     # the resume token now covers exactly the stream
    assert again.durable == len(second) and again.prefix_digest() == xxh3_128(second)
    again.close()
    rd.commit(sid)
    assert rd.generation == 2 and replica_bytes(rd) == bytes(p.data)


def test_a_recycled_upload_cut_short_by_a_crash_starts_over(tmp_path):
    root = str(tmp_path / "root")
    rd = ReplicaStore(root).ensure_disk(DISK_ID, SIZE)
    p = Primary(seed=4)
    upload(rd, p.cycle(t=1, n_writes=12))
    old_size = os.path.getsize(_spent(rd))
    second = p.cycle(t=2, n_writes=3)
    half = tmp_path / "half.bin"
    half.write_bytes(second[:len(second) // 2])
    sid = uuid.uuid4().hex
    code = ("import os, sys; from replicator.replica import ReplicaStore\n"
            "d = ReplicaStore(sys.argv[1]).disk(sys.argv[2]); up = d.open_upload(sys.argv[3])\n"
            "up.write(0, open(sys.argv[4], 'rb').read()); up.sync(); os._exit(0)\n")   # dies before close()
    subprocess.run([sys.executable, "-c", code, root, str(DISK_ID), sid, str(half)], check=True)
    path = ReplicaStore(root).disk(DISK_ID).spool_path(sid)
    assert os.path.getsize(path) == old_size and _marked(path)     # half the new stream, then old bytes
    rd = ReplicaStore(root).disk(DISK_ID)
    up = rd.open_upload(sid)
    assert up.durable == 0 and up.prefix_digest() == xxh3_128(b"")  # where the crash left it is unknown
    up.write(0, second)
    up.sync()
    up.close()
    assert os.path.getsize(path) == len(second) and not _marked(path)
    rd.commit(sid)
    assert replica_bytes(rd) == bytes(p.data)


def test_without_extended_attributes_the_spent_spool_is_cut_at_once(tmp_path, monkeypatch):
    rd = ReplicaStore(str(tmp_path / "root")).ensure_disk(DISK_ID, SIZE)
    p = Primary(seed=5)
    upload(rd, p.cycle(t=1, n_writes=12))

    def unsupported(*_a, **_kw):
        raise OSError(errno.ENOTSUP, "Operation not supported")
    monkeypatch.setattr(os, "setxattr", unsupported)
    sid = uuid.uuid4().hex
    up = rd.open_upload(sid)
    assert os.path.getsize(rd.spool_path(sid)) == 0 and up.size == 0
    _finish(rd, up, sid, p.cycle(t=2))
    assert replica_bytes(rd) == bytes(p.data)


def test_a_longer_stream_grows_the_recycled_file(tmp_path):
    rd = ReplicaStore(str(tmp_path / "root")).ensure_disk(DISK_ID, SIZE)
    p = Primary(seed=6)
    upload(rd, p.cycle(t=1, n_writes=1))
    old_size = os.path.getsize(_spent(rd))
    longer = p.cycle(t=2, n_writes=20)
    assert len(longer) > old_size
    sid = uuid.uuid4().hex
    upload(rd, longer, sid)
    assert rd.generation == 2 and replica_bytes(rd) == bytes(p.data)
    assert os.path.getsize(_spent(rd)) == len(longer) and not _marked(_spent(rd))


def test_a_commit_of_an_upload_that_never_closed_is_refused_and_the_upload_starts_over(tmp_path):
    rd, p, second, sid, up = _second_upload_written(tmp_path, seed=7)
    os.close(up.fd)                                  # as if close() never ran: the old bytes still follow
    up.fd = -1
    with pytest.raises(SequenceError, match="not finished"):
        rd.commit(sid)
    assert rd.generation == 1 and os.path.exists(rd.spool_path(sid))
    upload(rd, second, sid)                          # the sender's next try: resume token 0, then all of it
    assert rd.generation == 2 and replica_bytes(rd) == bytes(p.data)


def test_the_length_a_sender_may_resume_from_ignores_a_marked_spool(tmp_path):
    rd = ReplicaStore(str(tmp_path / "root")).ensure_disk(DISK_ID, SIZE)
    p = Primary(seed=8)
    upload(rd, p.cycle(t=1, n_writes=12))
    sid = uuid.uuid4().hex
    assert rd.upload_length(sid) is None
    up = rd.open_upload(sid)
    up.write(0, b"x" * 100)
    assert rd.upload_length(sid) == 0                # marked: its next open starts over
    up.sync()
    up.close()
    assert rd.upload_length(sid) == 100


def test_a_commit_keeps_a_recycled_upload_that_has_not_written_yet(tmp_path):
    """An upload that just took spent.bin still shows the previous stream's header until its first write
    lands; the sweep after a commit must not take it for an upload that can never apply."""
    rd = ReplicaStore(str(tmp_path / "root")).ensure_disk(DISK_ID, SIZE)
    p = Primary(seed=9)
    upload(rd, p.cycle(t=1, n_writes=12))
    sid = uuid.uuid4().hex
    up = rd.open_upload(sid)
    assert rd.sweep_spools(empty=False) == [] and os.path.exists(rd.spool_path(sid))
    _finish(rd, up, sid, p.cycle(t=2))
    assert replica_bytes(rd) == bytes(p.data)


def test_a_spent_spool_replaced_while_it_is_taken_is_cut_at_once(tmp_path, monkeypatch):
    """A commit may put another file at spent.bin between the mark and the rename: that file carries no
    mark, so the upload cuts it at once instead of writing over bytes it never marked."""
    rd = ReplicaStore(str(tmp_path / "root")).ensure_disk(DISK_ID, SIZE)
    p = Primary(seed=10)
    upload(rd, p.cycle(t=1, n_writes=12))
    real = store_mod._mark_stale

    def mark_then_swap(path):
        done = real(path)
        with open(path + ".other", "wb") as f:      # what a concurrent commit renames to spent.bin
            f.write(b"y" * 5000)
        os.replace(path + ".other", path)
        return done
    monkeypatch.setattr(store_mod, "_mark_stale", mark_then_swap)
    sid = uuid.uuid4().hex
    up = rd.open_upload(sid)
    assert not up.stale and os.path.getsize(rd.spool_path(sid)) == 0 and rd.upload_length(sid) == 0
    up.close()


def test_a_recycled_spool_that_cannot_be_cut_fails_the_upload_and_starts_over(tmp_path, monkeypatch):
    rd, p, stream, sid, up = _second_upload_written(tmp_path, seed=11)

    def refused(*_a, **_kw):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "removexattr", refused)
    with pytest.raises(DiskIOError, match="starts over"):
        up.close()
    monkeypatch.undo()
    assert rd.upload_length(sid) == 0
    upload(rd, stream, sid)
    assert replica_bytes(rd) == bytes(p.data)

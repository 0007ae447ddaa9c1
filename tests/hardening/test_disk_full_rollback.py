"""Kind 3, the worst case: a volume so full that after an apply stopped on ENOSPC even its rollback cannot
write. On a real 12 MiB tmpfs the replica is left with a cycle half-written over its last good point; the
last good point (and the one before) must still export byte for byte -- read through the journaled cycle's
undo log into the copy, nothing written on the full volume -- from `replicator points export` as an
operator runs it for a failover. Once space is freed the journaled cycle is finished and replication goes on."""
from __future__ import annotations

import os

import pytest

from replicator.errors import DiskIOError
from replicator.replica import ReplicaStore

from .conftest import MiB, Primary, image_bytes
from .test_disk_full import _check_point, _stream, small_fs  # noqa: F401 (fixture)


def _fill(where: str, keep: int) -> str:
    """Another writer takes all but `keep` bytes of the volume's free space."""
    path = os.path.join(where, "filler")
    st = os.statvfs(where)
    left = st.f_bavail * st.f_frsize - keep
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while left > 0:
            left -= os.write(fd, b"\1" * min(left, 65536))
    finally:
        os.close(fd)
    return path


def test_the_last_good_point_exports_when_even_the_rollback_cannot_write(tmp_path, small_fs):  # noqa: F811
    root = os.path.join(small_fs, "root")
    store = ReplicaStore(root)
    p = Primary(size=64 * MiB)
    disk = store.ensure_disk(p.disk_id, p.size, block_size=MiB)
    disk.set_retention(2)

    def spool(sid: str, stream: bytes) -> None:
        up = disk.open_upload(sid)
        up.write(0, stream)
        up.sync()
        up.close()
    spool("a1", _stream(p, [(0, os.urandom(MiB))]))
    disk.commit("a1")
    first = bytes(p.data)
    spool("a2", _stream(p, [(2 * MiB, os.urandom(64 << 10))]))     # allocates a block it barely fills
    disk.commit("a2")
    good = bytes(p.data)
    spool("b3", _stream(p, [(2 * MiB, os.urandom(MiB))]))           # fills that block: new pages needed
    real_open = disk.open_image
    filler = []

    def open_image(read_only=True, direct=False):    # the space goes once the undo log is sealed
        if direct and not filler:
            filler.append(_fill(small_fs, 256 << 10))   # a quarter of the cycle fits
        return real_open(read_only, direct)
    disk.open_image = open_image
    with pytest.raises(DiskIOError, match="disk full") as err:
        disk.commit("b3")
    assert "\n" not in err.value.message and filler
    # the rollback could not write either (nor can the retry at every open): the cycle stays journaled
    reopened = ReplicaStore(root).disk(p.disk_id)
    assert reopened.state.journal and reopened.state.journal["phase"] == "apply" and reopened.generation == 2
    assert os.path.exists(os.path.join(reopened.path, "undo", "3.hrl")) and os.statvfs(small_fs).f_bavail == 0
    before = image_bytes(reopened)

    # the failover export of the last good point and the point before it, through the real command line
    _check_point(root, p.disk_id, 2, good, tmp_path)
    _check_point(root, p.disk_id, 1, first, tmp_path)
    still = ReplicaStore(root).disk(p.disk_id)
    assert still.state.journal is not None and image_bytes(still) == before       # still full: nothing settled
    assert os.statvfs(small_fs).f_bavail == 0

    # space back: the next open finishes the journaled cycle from its verified spool, and replication goes on
    os.unlink(filler[0])
    settled = ReplicaStore(root).disk(p.disk_id)
    assert settled.state.journal is None and settled.generation == 3 and image_bytes(settled) == bytes(p.data)
    (tmp_path / "after").mkdir()
    _check_point(root, p.disk_id, 2, good, tmp_path / "after")
    up = settled.open_upload("c4")
    up.write(0, _stream(p, [(4 * MiB, os.urandom(MiB))]))
    up.sync()
    up.close()
    settled.commit("c4")
    assert settled.generation == 4 and image_bytes(settled) == bytes(p.data)

"""Kind 3: a volume that fills up during an apply with recovery points kept. On a real 12 MiB tmpfs: the
commit is refused with one line (507 disk_full), the cycle is rolled back or refused before anything was
written, no BufferError, and the last good point stays listed and exportable byte for byte -- also while
the disk is still full."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from replicator import delta
from replicator.errors import DiskIOError
from replicator.replica import ReplicaStore
from replicator.transport import AuthorizationEntry, ReplicaRefused
from replicator.vhdx import VhdxDisk

from .conftest import MiB, Peer, Primary, image_bytes

CLI = os.path.join(os.path.dirname(sys.executable), "replicator")


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(where)], check=True)
    yield str(where)
    subprocess.run(["umount", "-l", str(where)], check=True)


def _stream(p: Primary, writes) -> bytes:
    header = delta.StreamHeader(disk_id=p.disk_id, disk_size=p.size, block_size=MiB, generation=p.generation + 1,
                                base_generation=p.generation, consistency="crash", source_logs=[],
                                created=1.7e9 + 7200 * p.generation, kind="delta", extra={})
    sink = io.BytesIO()
    enc = delta.DeltaEncoder(header, sink)
    for off, data in writes:
        p.data[off:off + len(data)] = data
        enc.add_data(off, data)
    enc.finish()
    p.generation += 1
    return sink.getvalue()


def _check_point(root: str, p_id, generation: int, expected: bytes, tmp_path) -> None:
    listed = subprocess.run([CLI, "points", "list", "--root", root], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    out = str(tmp_path / f"export-{generation}.vhdx")
    exported = subprocess.run([CLI, "points", "export", "--root", root, str(p_id), "--generation", str(generation),
                               "--out", out], capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0 and "Traceback" not in exported.stderr, exported.stderr
    with VhdxDisk.open(out) as v:
        assert v.read(0, v.size) == expected


def test_disk_full_with_points_kept_is_refused_and_the_last_point_exports(servers, pki, tmp_path, small_fs):
    root = os.path.join(small_fs, "root")
    server = servers.cert([AuthorizationEntry("primary1", root)])
    peer = Peer(server, pki, tmp_path, "primary1")
    p = Primary(size=64 * MiB)
    peer.call("ensure_disk", p.disk_id, p.size, block_size=MiB)
    peer.send(p.disk_id, _stream(p, [(0, os.urandom(256 << 10))]))
    peer.call("checkpoint", p.disk_id, 1, 1, additional_points=4)
    peer.send(p.disk_id, _stream(p, [(MiB, os.urandom(256 << 10))]))
    good, good_gen = bytes(p.data), p.generation
    # a cycle that touches many unallocated blocks with little data on the wire
    pattern = os.urandom(64 << 10)
    big = _stream(p, [(off, pattern) for off in range(4 * MiB, 40 * MiB, MiB)])
    assert len(big) < 4 * MiB
    with pytest.raises(ReplicaRefused, match="disk full") as err:
        peer.send(p.disk_id, big)
    assert (err.value.status, err.value.code) == (507, "disk_full")
    assert "\n" not in str(err.value) and "BufferError" not in str(err.value)
    disk = server._stores[root].disk(p.disk_id)
    assert disk.generation == good_gen and disk.state.journal is None
    assert image_bytes(disk) == good
    _check_point(root, p.disk_id, good_gen, good, tmp_path)
    _check_point(root, p.disk_id, good_gen - 1, good[:MiB] + bytes(len(good) - MiB), tmp_path)
    assert [n for n in os.listdir(os.path.join(disk.path, "spool")) if n.endswith(".delta")] == []


def test_enospc_in_the_middle_of_an_apply_rolls_back(tmp_path, small_fs):
    """The free-space check passed, then another writer took the space: the apply itself meets ENOSPC.
    The O_DIRECT writer reports it as one DiskIOError (its buffer released), the cycle rolls back, and the
    point before stays readable."""
    store = ReplicaStore(os.path.join(small_fs, "root"))
    p = Primary(size=64 * MiB)
    disk = store.ensure_disk(p.disk_id, p.size, block_size=MiB)
    disk.set_retention(2)

    def commit(sid: str, stream: bytes):
        up = disk.open_upload(sid)
        up.write(0, stream)
        up.sync()
        up.close()
        return disk.commit(sid)
    commit("a1", _stream(p, [(0, os.urandom(MiB))]))
    good = bytes(p.data)
    pattern = os.urandom(4096) * 256                  # 1 MiB that compresses to little on the spool
    stream = _stream(p, [(off, pattern) for off in range(2 * MiB, 8 * MiB, MiB)])
    up = disk.open_upload("b2")
    up.write(0, stream)
    up.sync()
    up.close()
    real = disk._preflight
    filler = os.path.join(small_fs, "filler")

    def preflight_then_fill(*a, **kw):         # the space goes between the check and the writes
        real(*a, **kw)
        st = os.statvfs(small_fs)
        with open(filler, "wb") as f:
            try:
                f.write(b"\1" * (st.f_bavail * st.f_frsize - 3 * MiB))
            except OSError:
                pass
    disk._preflight = preflight_then_fill
    with pytest.raises(DiskIOError, match="disk full|No space") as err:
        disk.commit("b2")
    assert "\n" not in err.value.message and os.path.exists(filler)     # it failed in the apply
    assert disk.generation == 1 and disk.state.journal is None
    assert image_bytes(disk) == good
    reopened = ReplicaStore(os.path.join(small_fs, "root")).disk(p.disk_id)
    assert reopened.generation == 1 and image_bytes(reopened) == good
    os.unlink(filler)


def test_a_new_replica_on_a_full_volume_is_refused_in_one_line(servers, pki, tmp_path, small_fs):
    """Creating a disk's replica where the store's volume has no room: one line naming the store and the
    disk (507 disk_full over the peer API), nothing half-made left behind, and the same call succeeds once
    there is room."""
    root = os.path.join(small_fs, "root")
    store = ReplicaStore(root)
    filler = os.path.join(small_fs, "filler")
    with open(filler, "wb") as f:
        try:
            f.write(b"\1" * (12 * MiB))
        except OSError:
            pass
    p = Primary(size=64 * MiB)
    with pytest.raises(DiskIOError, match="disk full") as err:
        store.ensure_disk(p.disk_id, p.size, block_size=MiB)
    message = err.value.message
    assert "\n" not in message and "Errno" not in message and str(p.disk_id) in message and root in message
    leftovers = [n for n in os.listdir(os.path.join(root, "disks")) if not n.endswith(".lock")]
    assert leftovers == []
    server = servers.cert([AuthorizationEntry("primary1", root)])
    peer = Peer(server, pki, tmp_path, "primary1")
    with pytest.raises(ReplicaRefused, match="disk full") as refused:
        peer.call("ensure_disk", p.disk_id, p.size, block_size=MiB)
    assert (refused.value.status, refused.value.code) == (507, "disk_full")
    assert "\n" not in str(refused.value) and "Errno" not in str(refused.value)
    os.unlink(filler)
    peer.call("ensure_disk", p.disk_id, p.size, block_size=MiB)
    peer.send(p.disk_id, _stream(p, [(0, os.urandom(256 << 10))]))
    assert image_bytes(server._stores[root].disk(p.disk_id)) == bytes(p.data)

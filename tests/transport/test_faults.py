"""Refusals at commit and upload: a frame with a bad digest, a truncated stream, a cycle out of
sequence, a full disk. Each gives the primary the replica's reason, is counted on the replica, and
leaves the replica at its last good recovery point."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from replicator.transport import ReplicaClient, ReplicaRefused

from .conftest import MiB, Primary, image_bytes, run, write


class Link:
    """A primary with one committed cycle on a replica, and a helper to send the next stream."""

    def __init__(self, server, pki, tmp_path, primary: Primary, root: str, block_size: int = 2 * MiB):
        self.server, self.pki, self.tmp, self.primary = server, pki, tmp_path, primary
        self.n = 0
        self.disk_root = root
        run(self._ensure(block_size))
        self.send(primary.cycle(n_writes=3, max_write=65536))
        self.good_image = bytes(primary.data)

    async def _ensure(self, block_size):
        async with ReplicaClient(self.server.url, **self.pki.pair("primary1")) as c:
            await c.ensure_disk(self.primary.disk_id, self.primary.size, block_size=block_size)

    def send(self, stream: bytes) -> dict:
        self.n += 1
        path = write(self.tmp, f"s{self.n}.delta", stream)

        async def go():
            async with ReplicaClient(self.server.url, **self.pki.pair("primary1")) as c:
                return await c.send_stream(self.primary.disk_id, f"{self.n:04x}", path)
        return run(go())

    @property
    def disk(self):
        return self.server._stores[self.disk_root].disk(self.primary.disk_id)

    def assert_unchanged(self, generation: int = 1) -> None:
        assert self.disk.generation == generation
        assert image_bytes(self.disk) == self.good_image
        assert [n for n in os.listdir(os.path.join(self.disk.path, "spool")) if n.endswith(".delta")] == []


@pytest.fixture
def link(servers, pki, tmp_path):
    server = servers.cert()
    return Link(server, pki, tmp_path, Primary(), str(tmp_path / "root"))


def _corrupt_payload(stream: bytes) -> bytes:
    bad = bytearray(stream)
    bad[len(bad) // 2] ^= 0x01
    return bytes(bad)


@pytest.mark.parametrize("damage,reason", [
    (_corrupt_payload, "XXH3-128 of the plain data does not match"),
    (lambda s: s[:-100], "trunc|end of"),
    (lambda s: s[:len(s) // 3], "trunc|end of"),
])
def test_damaged_stream_is_refused_at_commit(link, damage, reason):
    stream = link.primary.cycle(n_writes=6, compress=False)
    with pytest.raises(ReplicaRefused) as err:
        link.send(damage(stream))
    assert err.value.status == 422 and err.value.code == "format"
    assert "commit" in str(err.value)
    assert re.search(reason, str(err.value), re.I), str(err.value)
    link.assert_unchanged()
    assert link.disk.state.counters["rejected_streams"] == 1
    assert link.server.counters["refused:format"] == 1


def test_cycle_out_of_sequence_is_refused(link):
    second = link.primary.cycle()
    image_after_second = bytes(link.primary.data)
    third = link.primary.cycle()
    with pytest.raises(ReplicaRefused, match="applies on generation 2, the replica holds 1") as err:
        link.send(third)
    assert (err.value.status, err.value.code) == (409, "sequence")
    link.assert_unchanged()
    assert link.disk.state.counters["rejected_streams"] == 1
    with pytest.raises(ReplicaRefused, match="applies on generation 0"):
        link.send(Primary(link.primary.disk_id).cycle())              # a replayed first cycle
    assert link.send(second)["generation"] == 2 and image_bytes(link.disk) == image_after_second
    assert link.send(third)["generation"] == 3 and image_bytes(link.disk) == bytes(link.primary.data)


def test_commit_of_an_unknown_upload_is_refused(link):
    async def go():
        async with ReplicaClient(link.server.url, **link.pki.pair("primary1")) as c:
            await c.commit(link.primary.disk_id, "abcdef")
    with pytest.raises(ReplicaRefused, match="no upload abcdef") as err:
        run(go())
    assert err.value.status == 404
    link.assert_unchanged()


@pytest.fixture
def small_fs(tmp_path):
    """A 12 MiB tmpfs: room for a replica disk and a small cycle, not for a big one."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(where)], check=True)
    yield str(where)
    subprocess.run(["umount", "-l", str(where)], check=True)


def test_full_disk_refuses_the_upload_and_keeps_the_last_point(servers, pki, tmp_path, small_fs):
    from replicator.transport import AuthorizationEntry
    root = os.path.join(small_fs, "root")
    server = servers.cert([AuthorizationEntry("primary1", root)])
    lk = Link(server, pki, tmp_path, Primary(size=64 * MiB), root, block_size=MiB)
    big = lk.primary.cycle(n_writes=40, max_write=MiB)          # ~16 MiB incompressible
    assert len(big) > 13 * MiB
    with pytest.raises(ReplicaRefused, match="No space left on device") as err:
        lk.send(big)
    assert (err.value.status, err.value.code) == (507, "disk_full")
    assert server.counters["refused:disk_full"] == 1 and server.counters["upload_disk_full"] == 1
    assert lk.disk.state.counters["upload_disk_full"] == 1
    assert lk.disk.generation == 1 and image_bytes(lk.disk) == lk.good_image
    spool = [n for n in os.listdir(os.path.join(lk.disk.path, "spool")) if n.endswith(".delta")]
    assert all(os.path.getsize(os.path.join(lk.disk.path, "spool", n)) == 0 for n in spool)


def test_full_disk_refuses_an_apply_it_has_no_room_for_before_writing(servers, pki, tmp_path, small_fs):
    """A small, very compressible stream that would allocate far more blocks than the volume holds: the
    free-space check refuses it before anything is written (no undo log exists when no earlier points are
    kept, so nothing could roll a half-applied cycle back)."""
    import io
    import uuid as uuidmod

    from replicator import delta
    from replicator.transport import AuthorizationEntry
    root = os.path.join(small_fs, "root")
    server = servers.cert([AuthorizationEntry("primary1", root)])
    lk = Link(server, pki, tmp_path, Primary(size=64 * MiB), root, block_size=MiB)
    p = lk.primary
    header = delta.StreamHeader(disk_id=p.disk_id, disk_size=p.size, block_size=MiB, generation=2,
                                base_generation=1, consistency="crash", source_logs=[], created=1.7e9,
                                kind="delta", extra={})
    sink = io.BytesIO()
    enc = delta.DeltaEncoder(header, sink)
    pattern = (uuidmod.uuid4().bytes * 4096)[:65536]
    for off in range(0, 40 * MiB, 65536):                 # 40 MiB of data, about 1 MiB on the wire
        enc.add_data(off, pattern)
    enc.finish()
    assert len(sink.getvalue()) < 2 * MiB
    with pytest.raises(ReplicaRefused, match="disk full: applying stream") as err:
        lk.send(sink.getvalue())
    assert (err.value.status, err.value.code) == (507, "disk_full")
    assert lk.disk.state.counters["rejected_disk_full"] == 1
    lk.assert_unchanged()


def test_a_primary_deletes_its_replica_when_protection_is_removed(link):
    async def go(pair):
        async with ReplicaClient(link.server.url, **link.pki.pair(pair)) as c:
            return await c.delete_disk(link.primary.disk_id)
    disk_dir = link.disk.path
    assert run(go("primary1")) is True and not os.path.exists(disk_dir)
    assert run(go("primary1")) is False                       # already gone: nothing to delete
    assert link.server.counters["disks_deleted"] == 1

"""Adversarial review of session 5's replica additions: the checkpoint's "disks" (replica/store.py
record_checkpoint). A checkpoint the replica refuses changes nothing: before, a refused one (a disk count out
of range, or a generation the replica does not hold) had already applied its additional_points -- dropping
recovery points for good -- and its disk count, which the next save persisted."""
from __future__ import annotations

import json

import pytest

from replicator.replica import ReplicaStore
from replicator.errors import SequenceError, UsageError

from ..replica.test_machine_cuts import Disk, commit


@pytest.fixture
def two_disk_replica(tmp_path):
    """One disk of a two-disk machine keeping 2 additional points, after 4 whole cycles."""
    store = ReplicaStore(str(tmp_path / "root"))
    d = Disk(7)
    rd = store.ensure_disk(d.id, 8 << 20, name="d0.vhdx", machine="vm")
    for point in range(1, 5):
        commit(rd, d.cycle(1000.0 + 3600 * point))             # an hour apart: the hourly points are kept
        rd.record_checkpoint(d.generation, point, additional_points=2, disks=2)
    return rd, d


@pytest.mark.parametrize("disks", [0, -1, 257, 1 << 62])
def test_a_checkpoint_refused_for_its_disk_count_keeps_every_point(two_disk_replica, disks):
    rd, d = two_disk_replica
    before = [p.generation for p in rd.state.points]
    assert len(before) >= 3
    with pytest.raises(UsageError, match="disks"):
        rd.record_checkpoint(d.generation, 5, additional_points=0, disks=disks)
    assert [p.generation for p in rd.state.points] == before
    assert (rd.state.additional_points, rd.state.machine_disks) == (2, 2)


def test_a_checkpoint_of_another_generation_changes_nothing(two_disk_replica):
    rd, d = two_disk_replica
    before, cuts = [p.generation for p in rd.state.points], [list(c) for c in rd.state.cuts]
    with pytest.raises(SequenceError):
        rd.record_checkpoint(d.generation + 1, 5, additional_points=0, disks=1)
    assert [p.generation for p in rd.state.points] == before and rd.state.cuts == cuts
    assert (rd.state.additional_points, rd.state.machine_disks) == (2, 2)


def test_out_of_range_retention_in_a_checkpoint_changes_nothing(two_disk_replica):
    rd, d = two_disk_replica
    with pytest.raises(UsageError, match="additional"):
        rd.record_checkpoint(d.generation, 5, additional_points=25, disks=1)
    assert (rd.state.additional_points, rd.state.machine_disks) == (2, 2)


# ------------------------------------------------------------------------------- the upload's header check
def _header_len(stream: bytes) -> int:
    from replicator.delta.format import PREFIX
    return PREFIX.size + PREFIX.unpack_from(stream)[3] + 4


def test_a_header_in_one_byte_chunks_then_a_resume_after_a_header_only_body_commits(servers, pki, tmp_path):
    """_stream_header reads the header as it trickles in (one byte per chunk), and a body that ended right after
    the header keeps it in a spool that a resume at its offset completes."""
    import asyncio

    from replicator.transport import AuthorizationEntry
    from .conftest import Peer, Primary

    root = str(tmp_path / "root")
    server = servers.cert([AuthorizationEntry("primary1", root)])
    peer = Peer(server, pki, tmp_path, "primary1")
    p = Primary()
    peer.call("ensure_disk", p.disk_id, p.size)
    stream = p.cycle()
    head = _header_len(stream)

    async def trickle():
        for i in range(head):
            yield stream[i:i + 1]
            await asyncio.sleep(0)
    status, raw = peer.raw("PUT", f"/v1/disks/{p.disk_id}/uploads/cd34?offset=0", data=trickle())
    assert status == 200 and json.loads(raw)["durable"] == head, raw
    status, raw = peer.raw("PUT", f"/v1/disks/{p.disk_id}/uploads/cd34?offset={head}", data=stream[head:])
    assert status == 200, raw
    peer.call("commit", p.disk_id, "cd34")
    assert peer.call("state", p.disk_id)["generation"] == 1


def test_an_oversized_or_stalled_header_is_refused_and_leaves_nothing(servers, pki, tmp_path):
    import asyncio
    import struct

    from replicator.delta.format import MAGIC, MAX_HEADER_BODY, PREFIX
    from replicator.transport import AuthorizationEntry

    from .conftest import Peer, Primary, tree

    root = str(tmp_path / "root")
    server = servers.cert([AuthorizationEntry("primary1", root)], read_timeout=1)
    peer = Peer(server, pki, tmp_path, "primary1")
    p = Primary()
    peer.call("ensure_disk", p.disk_id, p.size)
    before = {k: v for k, v in tree(root).items() if not k.endswith("state.json")}
    huge = PREFIX.pack(MAGIC, 1, 0, MAX_HEADER_BODY + 1) + b"{" * 4096
    status, raw = peer.raw("PUT", f"/v1/disks/{p.disk_id}/uploads/ef56?offset=0", data=huge)
    assert status == 400 and b"not a delta stream" in raw, raw
    big = PREFIX.pack(MAGIC, 1, 0, 0xFFFFFFFF) + struct.pack("<I", 0)
    status, raw = peer.raw("PUT", f"/v1/disks/{p.disk_id}/uploads/ef57?offset=0", data=big)
    assert status == 400, raw

    async def loris():
        yield MAGIC[:3]
        await asyncio.sleep(2.5)
        yield MAGIC[3:]
    status, raw = peer.raw("PUT", f"/v1/disks/{p.disk_id}/uploads/ef58?offset=0", data=loris())
    assert status == 400 and b"no stream header within" in raw, raw
    assert {k: v for k, v in tree(root).items() if not k.endswith("state.json")} == before

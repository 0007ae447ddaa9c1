"""Kinds 4 and 7: nothing left behind. A killed upload's spool that can never apply goes at the next start
and at the commit of a later generation, a resumable one is kept and resumed; refused requests (a disk PUT
refused for its body, its size, its owner; an upload refused for its offset or its count) create nothing."""
from __future__ import annotations

import json
import os
import uuid

import pytest

from replicator.transport import AuthorizationEntry, AuthorizationError, ReplicaRefused
from replicator.transport.server import ReplicaServer

from .conftest import MiB, Peer, Primary, image_bytes, tree


def _spools(disk) -> dict[str, int]:
    d = os.path.join(disk.path, "spool")
    return {n: os.path.getsize(os.path.join(d, n)) for n in os.listdir(d) if n.endswith(".delta")}


def test_dead_spools_go_at_restart_and_at_commit_resumable_ones_stay(servers, pki, tmp_path):
    root = str(tmp_path / "root")
    entries = [AuthorizationEntry("primary1", root)]
    server = servers.cert(entries)
    peer = Peer(server, pki, tmp_path, "primary1")
    p = Primary()
    peer.call("ensure_disk", p.disk_id, p.size)
    first = p.cycle()
    peer.send(p.disk_id, first)
    # a killed initial upload replayed later (its base is generation 0: it can never apply again) ...
    stale = Primary(p.disk_id).cycle()
    peer.send(p.disk_id, stale[:len(stale) // 2], stream_id="dead01", commit=False)
    # ... a killed upload of the next cycle (resumable), and an empty spool of a connection that died at once
    nxt = p.cycle()
    peer.send(p.disk_id, nxt[:len(nxt) // 2], stream_id="a11e01", commit=False)
    disk = server._stores[root].disk(p.disk_id)
    open(disk.spool_path("e0e0"), "wb").close()
    assert set(_spools(disk)) == {"dead01.delta", "a11e01.delta", "e0e0.delta"}
    # restart: a new server process on the same root (the first one's open of the disk ends with it)
    disk.close()
    server2 = servers.cert(entries)
    disk2 = server2._stores[root].disk(p.disk_id)
    assert _spools(disk2) == {"a11e01.delta": len(nxt) // 2}
    # the sender resumes the kept one and commits it
    peer2 = Peer(server2, pki, tmp_path, "primary1")
    assert peer2.send(p.disk_id, nxt, stream_id="a11e01")["generation"] == 2
    assert image_bytes(disk2) == bytes(p.data)
    # a later generation's commit removes spools of earlier ones that arrived meanwhile
    third = p.cycle()
    peer2.send(p.disk_id, nxt[:1000], stream_id="01d0", commit=False)       # generation 1 -> 2: superseded
    peer2.send(p.disk_id, third)
    assert _spools(disk2) == {} and disk2.generation == 3 and image_bytes(disk2) == bytes(p.data)


def test_refused_disk_requests_create_nothing(servers, pki, tmp_path):
    root = str(tmp_path / "root")
    server = servers.cert([AuthorizationEntry("primary1", root, "tenant-a"),
                           AuthorizationEntry("primary2", root, "tenant-b")], max_disk_size=1 << 30)
    a, b = Peer(server, pki, tmp_path, "primary1"), Peer(server, pki, tmp_path, "primary2")
    p = Primary()
    a.call("ensure_disk", p.disk_id, p.size)
    before = tree(root)
    for body in ({"size": 2 << 30}, {"size": "16M"}, {"size": 1000}, {"size": 16 * MiB, "block_size": 3},
                 {"size": 16 * MiB, "machine": "../../etc"}, {"size": 16 * MiB, "name": "x" * 300},
                 {"size": True}, {"size": -512}):
        fresh = uuid.uuid4()
        status, raw = a.raw("PUT", f"/v1/disks/{fresh}", json=body)
        assert status == 400, (body, status, raw)
        assert tree(root) == before and not os.path.exists(os.path.join(root, "disks", str(fresh)))
    # another tenant PUTting the same id is refused, and takes nothing
    with pytest.raises(AuthorizationError, match="belongs to trust group 'tenant-a'"):
        b.call("ensure_disk", p.disk_id, p.size)
    assert tree(root) == before
    assert json.load(open(os.path.join(root, "owners.json"))) == {str(p.disk_id): "tenant-a"}


def test_refused_uploads_create_no_spool(servers, pki, tmp_path):
    root = str(tmp_path / "root")
    server = servers.cert([AuthorizationEntry("primary1", root)], max_uploads=2)
    peer = Peer(server, pki, tmp_path, "primary1")
    p = Primary()
    peer.call("ensure_disk", p.disk_id, p.size)
    before = tree(root)
    status, raw = peer.raw("PUT", f"/v1/disks/{p.disk_id}/uploads/abc1?offset=4096", data=b"x" * 10)
    assert status == 409 and b"continues at byte 0" in raw
    status, _ = peer.raw("PUT", f"/v1/disks/{p.disk_id}/uploads/abc1?offset=-1", data=b"x")
    assert status == 400
    disk = server._stores[root].disk(p.disk_id)
    assert _spools(disk) == {}
    assert peer.call("state", p.disk_id)["uploads"] == {}
    # a peer making up streams cannot spool without bound
    stream = p.cycle()
    peer.send(p.disk_id, stream[:50], stream_id="01", commit=False)
    peer.send(p.disk_id, stream[:50], stream_id="02", commit=False)
    with pytest.raises(ReplicaRefused, match="max_uploads"):
        peer.send(p.disk_id, stream[:50], stream_id="03", commit=False)
    assert set(_spools(disk)) == {"01.delta", "02.delta"}
    assert {k for k in tree(root)} - set(before) == {f"disks/{p.disk_id}/spool/01.delta",
                                                      f"disks/{p.disk_id}/spool/02.delta"}
    assert not any(len(k) > 2 for k in server._locks)          # no lock kept per made-up stream


def test_server_settings_are_checked():
    with pytest.raises(Exception, match="header_timeout"):
        ReplicaServer([AuthorizationEntry("p", "/tmp/x")], certfile="c", keyfile="k", cafile="a", header_timeout=0)


@pytest.mark.parametrize("body", [b"", b"\x00" * 300, b"not a delta stream at all"], ids=["empty", "zeros", "text"])
def test_a_new_upload_with_nothing_usable_leaves_nothing(servers, pki, tmp_path, body):
    """An upload from byte 0 whose body brings nothing that could ever apply (none at all, or bytes that are
    not a stream) creates no spool and keeps the recycled spool file as it was (found by the fuzzer)."""
    root = str(tmp_path / "root")
    server = servers.cert([AuthorizationEntry("primary1", root)])
    peer = Peer(server, pki, tmp_path, "primary1")
    p = Primary()
    peer.call("ensure_disk", p.disk_id, p.size)
    peer.send(p.disk_id, p.cycle())                     # leaves spool/spent.bin for the next upload to reuse
    before = tree(root)
    assert any(k.endswith("spent.bin") for k in before)
    status, raw = peer.raw("PUT", f"/v1/disks/{p.disk_id}/uploads/ab12?offset=0", data=body)
    assert status in (200, 400), raw
    after = {k: v for k, v in tree(root).items() if not k.endswith("state.json")}
    assert after == {k: v for k, v in before.items() if not k.endswith("state.json")}

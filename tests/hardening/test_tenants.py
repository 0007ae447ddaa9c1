"""Kind 1: tenants sharing a replica site. Two primaries, each with its own certificate, authorized into
their own storage root and trust group, both call their machine vm01. The site keeps two machines: a test
failover of one holds exactly its own disk (compared byte for byte), and the other's disk -- without any
recovery point -- does not block it. On the transport, a primary of another trust group in the same root
can neither read, upload to, commit on, checkpoint nor delete a disk it does not own."""
from __future__ import annotations

import asyncio
import os
import types
import uuid

import pytest

from replicator.daemon.replica_role import ReplicaRole
from replicator.daemon.replica_site import ReplicaSite
from replicator.orchestration.jobs import JobRegistry
from replicator.transport import AuthorizationEntry, AuthorizationError
from replicator.vhdx import VhdxDisk

from replicator.orchestration.settings import ReplicaSettings

from .conftest import MiB, Peer, Primary, image_bytes, tree


def _site(server, tmp_path) -> ReplicaSite:
    """The replica site's operations over a running server (the daemon's parts they use, and no more)."""
    state = str(tmp_path / "state")
    os.makedirs(state, exist_ok=True)
    settings = ReplicaSettings(failover_dir=str(tmp_path / "failover"),
                               test_failover_dir=str(tmp_path / "test-failover"))
    daemon = types.SimpleNamespace(config=types.SimpleNamespace(replica=settings, plans={}, machines=[]),
                                   state_dir=state, jobs=JobRegistry(state), machines={},
                                   replica_server=ReplicaRole(server))
    return ReplicaSite(daemon)


def on_server_loop(servers, coro):
    return asyncio.run_coroutine_threadsafe(coro, servers.threads[-1].loop).result(120)


def test_another_tenants_machine_of_the_same_name_stays_apart(servers, pki, tmp_path):
    root_a, root_b = str(tmp_path / "root-a"), str(tmp_path / "root-b")
    server = servers.cert([AuthorizationEntry("primary1", root_a, "tenant-a"),
                           AuthorizationEntry("primary2", root_b, "tenant-b")])
    victim, attacker = Peer(server, pki, tmp_path, "primary1"), Peer(server, pki, tmp_path, "primary2")
    mine, theirs = Primary(seed=1), Primary(seed=2)
    victim.call("ensure_disk", mine.disk_id, mine.size, name="d0.vhdx", machine="vm01")
    victim.send(mine.disk_id, mine.cycle())
    victim.call("checkpoint", mine.disk_id, 1, 1)
    # the attacker names its machine and disk like ours, sends a cycle and never a checkpoint
    attacker.call("ensure_disk", theirs.disk_id, theirs.size, name="d0.vhdx", machine="vm01")
    attacker.send(theirs.disk_id, theirs.cycle())

    site = _site(server, tmp_path)
    machines = site.machines()
    assert sorted(machines) == ["vm01@tenant-a", "vm01@tenant-b"]
    assert [d.id for d in machines["vm01@tenant-a"].disks] == [str(mine.disk_id)]
    assert [d.id for d in machines["vm01@tenant-b"].disks] == [str(theirs.disk_id)]
    assert machines["vm01@tenant-a"].point()["generations"] == {str(mine.disk_id): 1}

    view = on_server_loop(servers, site.test_failover("vm01@tenant-a"))
    try:
        folder = tmp_path / "test-failover" / "vm01@tenant-a"
        assert [n for n in os.listdir(folder) if n.endswith(".vhdx")] == ["d0.vhdx"]
        with VhdxDisk.open(str(folder / "d0.vhdx")) as d:
            assert d.read(0, d.size) == bytes(mine.data)
        assert [d["disk_id"] for d in view["disks"]] == [str(mine.disk_id)]
    finally:
        on_server_loop(servers, site.cleanup_test_failover("vm01@tenant-a"))
        on_server_loop(servers, site.stop())


def test_one_tenant_alone_keeps_plain_machine_names(servers, pki, tmp_path):
    server = servers.cert([AuthorizationEntry("primary1", str(tmp_path / "root"), "tenant-a")])
    peer = Peer(server, pki, tmp_path, "primary1")
    p = Primary()
    peer.call("ensure_disk", p.disk_id, p.size, name="d0.vhdx", machine="vm01")
    assert list(_site(server, tmp_path).machines()) == ["vm01"]


def test_a_foreign_trust_group_in_the_same_root_cannot_touch_a_disk(servers, pki, tmp_path):
    root = str(tmp_path / "root")
    server = servers.cert([AuthorizationEntry("primary1", root, "tenant-a"),
                           AuthorizationEntry("primary2", root, "tenant-b")])
    owner, intruder = Peer(server, pki, tmp_path, "primary1"), Peer(server, pki, tmp_path, "primary2")
    p = Primary()
    owner.call("ensure_disk", p.disk_id, p.size)
    owner.send(p.disk_id, p.cycle())
    disk = server._stores[root].disk(p.disk_id)
    good, before = image_bytes(disk), tree(root)
    d = f"/v1/disks/{p.disk_id}"
    for method, path, kw in [("GET", d, {}), ("GET", d + "/digests", {}), ("DELETE", d, {}),
                             ("POST", d + "/checkpoint", {"json": {"generation": 1, "point": 9}}),
                             ("GET", d + "/uploads/ab", {}), ("PUT", d + "/uploads/ab?offset=0", {"data": b"x"}),
                             ("DELETE", d + "/uploads/ab", {}), ("POST", d + "/uploads/ab/commit", {}),
                             ("PUT", d, {"json": {"size": p.size}})]:
        status, raw = intruder.raw(method, path, **kw)
        assert status == 403 and b"belongs to trust group" in raw, (method, path, status, raw)
    assert tree(root) == before and image_bytes(disk) == good
    health = intruder.call("health")
    assert health["disks"] == {}
    with pytest.raises(AuthorizationError):
        intruder.call("state", p.disk_id)
    assert str(uuid.UUID(str(p.disk_id))) in owner.call("health")["disks"]

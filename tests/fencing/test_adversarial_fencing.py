"""Adversarial fencing checks over real mutual TLS: a primary of another trust group must not move the
epoch of a disk it does not own, even one no primary has claimed yet (a seed imported on the replica)."""
from __future__ import annotations

import json
import uuid

from replicator.replica import ReplicaStore
from replicator.transport import AuthorizationEntry

from .conftest import Primary, write
from .test_replica_fencing import cycle


def test_an_unclaimed_disk_keeps_its_epoch_from_another_trust_group(servers, pki, tmp_path, peer_factory):
    """A seed imported on the replica site is claimed by nobody until its primary's first request. A peer of
    another trust group sending the highest epoch there raised the disk's epoch for good: its own primary
    was then fenced forever (no epoch can exceed it)."""
    root = str(tmp_path / "root")
    server = servers.cert([AuthorizationEntry("primary1", root, "g1"), AuthorizationEntry("primary2", root, "g2")])
    p = Primary(seed=21)
    stream = write(tmp_path, "seed.delta", p.cycle())          # the seed, imported on the replica host
    d = ReplicaStore(root).ensure_disk(p.disk_id, p.size, machine="vm01")
    with open(stream, "rb") as f:
        data = f.read()
    sid = str(uuid.uuid4())
    up = d.open_upload(sid)
    up.write(0, data)
    up.sync()
    up.close()
    d.commit(sid)
    other = peer_factory(server, "primary2")
    status, body = other.raw("GET", f"/v1/disks/{p.disk_id}", headers={"X-Replicator-Epoch": str(2 ** 63 - 1)})
    assert ReplicaStore(root).disk(p.disk_id).state.epoch in (None, 0), (status, body)
    answer = cycle(server, pki, tmp_path, p, 1, 1)             # its own primary, at epoch 1, goes on
    assert answer["generation"] == 2
    assert ReplicaStore(root).disk(p.disk_id).state.epoch == 1
    json.loads(body)

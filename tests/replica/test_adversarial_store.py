"""Adversarial checks of the replica store (replica/store.py) on real stores and streams."""
from __future__ import annotations

import uuid

import pytest

from replicator.replica import ReplicaStore, SequenceError

from ..extended.test_adversarial import upload as _upload   # one spooled, synced, uncommitted cycle

MiB = 1 << 20
SIZE = 8 * MiB



def test_a_cycle_uploaded_before_a_failover_is_not_committed_after_it(tmp_path):
    """A standalone primary (no fencing epoch) checks the failover only when a cycle begins (ensure_disk).
    Its upload is under way when the replica site fails the machine over; the commit that follows must be
    refused, or the failed-over disk moves past the point it was failed over at."""
    store = ReplicaStore(str(tmp_path))
    disk_id = uuid.uuid4()
    d = store.ensure_disk(disk_id, SIZE, block_size=MiB, machine="vm01")
    d.commit(_upload(d, disk_id, 1, [(0, b"\x01" * MiB)]))
    stream = _upload(d, disk_id, 2, [(MiB, b"\x02" * MiB)])       # the upload of the next cycle
    d.set_failover({"generation": 1, "time": 1.0})                 # the failover on the replica site
    with pytest.raises(SequenceError, match="failed over"):
        d.commit(stream)                                           # standalone: no epoch
    assert d.generation == 1
    assert ReplicaStore(str(tmp_path)).disk(disk_id).generation == 1

"""Adversarial review of session 5's replica additions: the checkpoint's "disks" (replica/store.py
record_checkpoint). A checkpoint the replica refuses changes nothing: before, a refused one (a disk count out
of range, or a generation the replica does not hold) had already applied its additional_points -- dropping
recovery points for good -- and its disk count, which the next save persisted."""
from __future__ import annotations

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

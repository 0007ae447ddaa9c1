"""A machine of several disks with no additional points kept: its disks commit and checkpoint one after
the other, so the primary can be lost with one disk at the new cut and another still at the old one. The
replica must still hold one cut on every disk (the previous one) and export it byte for byte; before, the
first disk's commit dropped its only copy of that cut and the machine had no recovery point at all."""
from __future__ import annotations

import io
import os
import random
import uuid

from replicator import delta
from replicator.daemon.replica_site import DiskRef, ReplicatedMachine
from replicator.replica import ReplicaStore
from replicator.vhdx import VhdxDisk

MiB = 1 << 20
SIZE = 8 * MiB


class Disk:
    """One primary disk as bytes, producing delta streams of random changes."""

    def __init__(self, seed: int):
        self.id, self.data, self.rng, self.generation = uuid.UUID(int=seed + 1), bytearray(SIZE), random.Random(seed), 0

    def cycle(self, t: float) -> bytes:
        header = delta.StreamHeader(disk_id=self.id, disk_size=SIZE, block_size=MiB, generation=self.generation + 1,
                                    base_generation=self.generation, consistency="crash", source_logs=[],
                                    created=t, kind="delta", extra={})
        sink = io.BytesIO()
        enc = delta.DeltaEncoder(header, sink)
        for _ in range(4):
            off, n = self.rng.randrange(0, SIZE - 200_000), self.rng.randrange(1, 200_000)
            chunk = self.rng.randbytes(n)
            self.data[off:off + n] = chunk
            enc.add_data(off, chunk)
        enc.finish()
        self.generation += 1
        return sink.getvalue()


def commit(rd, stream: bytes) -> None:
    sid = uuid.uuid4().hex
    up = rd.open_upload(sid)
    up.write(0, stream)
    up.sync()
    up.close()
    rd.commit(sid)


def exported(rd, generation: int, path: str) -> bytes:
    if os.path.exists(path):
        os.unlink(path)
    rd.materialize(generation, path)
    with VhdxDisk.open(path) as v:
        return v.read(0, SIZE)


def test_a_machine_point_survives_a_primary_lost_between_its_disks(tmp_path):
    store = ReplicaStore(str(tmp_path / "root"))
    disks = [Disk(0), Disk(1)]
    rds = [store.ensure_disk(d.id, SIZE, name=f"d{i}.vhdx", machine="vm") for i, d in enumerate(disks)]
    machine = ReplicatedMachine("vm", [DiskRef(store, rd) for rd in rds])
    at_cut = {}
    t = 1000.0
    for point in range(1, 5):                  # whole machine cycles: every disk commits, then checkpoints
        for d, rd in zip(disks, rds):
            commit(rd, d.cycle(t))
        for d, rd in zip(disks, rds):
            rd.record_checkpoint(d.generation, point, additional_points=0, disks=2)
        at_cut[point] = [bytes(d.data) for d in disks]
        t += 30
    assert [p["point"] for p in machine.points()][-1] == 4
    assert all(len(rd.points) <= 3 for rd in rds)          # bounded: the two newest cuts and the latest

    # cycle 5: disk 0 commits and even checkpoints; the primary is lost before disk 1 commits
    commit(rds[0], disks[0].cycle(t))
    assert machine.points()[-1]["point"] == 4
    rds[0].record_checkpoint(disks[0].generation, 5, additional_points=0, disks=2)
    latest = machine.point()
    assert latest["point"] == 4                             # the newest cut every disk holds
    for i, (d, rd) in enumerate(zip(disks, rds)):
        generation = latest["generations"][rd.state.disk_id]
        assert exported(rd, generation, str(tmp_path / f"d{i}.vhdx")) == at_cut[4][i], i


def test_a_single_disk_machine_keeps_no_undo_without_additional_points(tmp_path):
    store = ReplicaStore(str(tmp_path / "root"))
    d = Disk(3)
    rd = store.ensure_disk(d.id, SIZE, name="d0.vhdx", machine="vm")
    for point in range(1, 4):
        commit(rd, d.cycle(1000.0 + point))
        rd.record_checkpoint(d.generation, point, additional_points=0, disks=1)
    assert len(rd.points) == 1 and not os.listdir(os.path.join(rd.path, "undo"))


def test_the_spare_cut_is_listed_only_while_it_is_the_newest_common_one(tmp_path):
    store = ReplicaStore(str(tmp_path / "root"))
    disks = [Disk(5), Disk(6)]
    rds = [store.ensure_disk(d.id, SIZE, name=f"d{i}.vhdx", machine="vm") for i, d in enumerate(disks)]
    machine = ReplicatedMachine("vm", [DiskRef(store, rd) for rd in rds])
    for point in (1, 2):
        for d, rd in zip(disks, rds):
            commit(rd, d.cycle(1000.0 + point))
            rd.record_checkpoint(d.generation, point, additional_points=0, disks=2)
    assert [p["point"] for p in machine.points()] == [2]        # latest only, as the retention rule says
    commit(rds[0], disks[0].cycle(1003.0))
    rds[0].record_checkpoint(disks[0].generation, 3, additional_points=0, disks=2)
    assert [p["point"] for p in machine.points()] == [2]        # disk 1 has not reached 3: 2 still stands

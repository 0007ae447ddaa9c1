"""A replica moved by another writer (a copy of the disk with the same VirtualDiskId) while a cycle of ours
was on its way: our stream can never apply. The next cycle must not resend it forever (that wedged the
disk: "stream applies on generation 4, the replica holds 6"), and a resync of our own dirty regions only
would leave the other writer's blocks: every block is compared, and the replica ends equal to our disk."""
from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from replicator.errors import ReplicatorError
from replicator.replica import ReplicaStore
from replicator.replication import DiskReplicator
from replicator.targets import LocalTarget
from replicator.tracking import TrackedDisk
from replicator.vhdx import VhdxDisk, create_vhdx

MiB = 1 << 20


def test_a_stream_overtaken_by_another_writer_leads_to_a_full_compare(tmp_path):
    ours, theirs = str(tmp_path / "vm.vhdx"), str(tmp_path / "copy.vhdx")
    with create_vhdx(ours, 32 * MiB, block_size=2 * MiB) as d:
        d.write(0, os.urandom(4 * MiB))
    shutil.copy(ours, theirs)
    target = LocalTarget(str(tmp_path / "replica"))
    mine, other = TrackedDisk(ours), TrackedDisk(theirs)
    try:
        rep = DiskReplicator(mine, target)
        assert asyncio.run(rep.run_cycle()).kind == "initial"

        mine.write(1 * MiB, b"\x11" * 65536)              # our change, on its way when the other writer lands
        info = asyncio.run(target.ensure_disk(mine.disk.virtual_disk_id, mine.size))
        mine.cut()
        other.write(20 * MiB, b"\x77" * MiB)               # a region we never wrote
        asyncio.run(DiskReplicator(other, target).run_cycle())   # the copy's first cycle: moves the replica
        [rec] = mine.state.sealed_logs
        with pytest.raises(ReplicatorError, match="applies on generation"):
            asyncio.run(rep._ship_log(rec, info.generation, "crash", info.committed, rep_result()))
        stale = os.path.join(rep.outbox, f"{rec.unique_id.replace('-', '')}.delta")
        assert os.path.exists(stale)                       # complete: a plain retry would resend it as is

        result = asyncio.run(rep.run_cycle())
        assert result.kind == "resync" and not os.path.exists(stale)
        assert mine.state.state == "tracking"
        again = asyncio.run(rep.run_cycle())               # and ordinary cycles go on after it
        assert again.kind == "delta"
    finally:
        other.close()
    expected = open_bytes(mine)
    mine.close()
    store = ReplicaStore(str(tmp_path / "replica"))
    with VhdxDisk.open(store.disk(store.disk_ids()[0]).image_path) as r:
        assert r.read(0, 32 * MiB) == expected             # the other writer's 1 MiB at 20 MiB is gone too


def rep_result():
    from replicator.replication.cycle import CycleResult
    return CycleResult()


def open_bytes(tracked) -> bytes:
    return tracked.read(0, tracked.size)

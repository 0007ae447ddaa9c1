"""Planned failover with zero loss, then reverse replication that reuses the former primary's disk: only
the blocks written on the replica site since the failover travel back."""
from __future__ import annotations

import asyncio
import os

from replicator.replica import ReplicaStore
from replicator.replication import DiskReplicator
from replicator.targets import LocalTarget
from replicator.tracking import TrackedDisk
from replicator.vhdx import VhdxDisk, create_vhdx

MiB = 1 << 20
SIZE = 64 * MiB


def run(coro):
    return asyncio.run(coro)


def read_all(path: str) -> bytes:
    with VhdxDisk.open(path) as d:
        return d.read(0, d.size)


def test_planned_failover_then_reverse_replication(tmp_path):
    site_a, site_b = tmp_path / "site-a", tmp_path / "site-b"
    site_a.mkdir()
    site_b.mkdir()
    primary = str(site_a / "vm.vhdx")
    with create_vhdx(primary, SIZE, block_size=2 * MiB) as d:
        for k in range(20):
            d.write(k * 3 * MiB, bytes([k + 1]) * MiB)
    tracker = TrackedDisk(primary)
    to_b = LocalTarget(str(site_b / "replica"))
    rep = DiskReplicator(tracker, to_b)
    run(rep.run_cycle())                                   # initial replication
    tracker.write(5 * MiB, b"\xaa" * 100000)               # the VM keeps writing ...
    tracker.write(40 * MiB, b"\xbb" * 5000)
    disk_id = tracker.disk.virtual_disk_id
    # planned failover: the primary stops, a final cycle ships everything
    final = run(rep.run_cycle())
    assert final.kind == "delta"
    tracker.close()
    store_b = ReplicaStore(str(site_b / "replica"))
    rd = store_b.disk(disk_id)
    failed_over = str(site_b / "vm.vhdx")
    rd.materialize(rd.generation, failed_over)
    assert read_all(failed_over) == read_all(primary), "planned failover lost data"
    with VhdxDisk.open(failed_over) as d:
        assert d.virtual_disk_id == disk_id                # the same virtual disk, now on site B

    # the VM runs on site B; reverse replication goes to site A, reusing the old primary disk
    vm_b = TrackedDisk(failed_over)
    vm_b.write(7 * MiB, b"\xcc" * 3 * 65536)               # written on site B after the failover
    store_a = ReplicaStore(str(site_a / "replica"))
    store_a.adopt(disk_id, primary)                        # the former primary's copy is the starting point
    back = run(DiskReplicator(vm_b, LocalTarget(str(site_a / "replica"))).run_cycle())
    assert back.kind == "resync"
    assert back.plain_bytes <= 4 * 65536, back             # only what changed on site B travels back
    vm_b.close()
    reverse = store_a.disk(disk_id)
    with reverse.open_image() as img:
        assert img.read(0, SIZE) == read_all(failed_over)
    assert os.path.exists(failed_over)

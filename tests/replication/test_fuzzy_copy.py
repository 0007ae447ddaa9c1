"""Initial replication and resync read the disk while the guest writes (through the export process) and
are made whole by the log begun at their start: the replica's point is the disk as it was at one instant.

The writer acknowledges one 4 KiB write at a time, each to a new slot in a shuffled order, so the disk at
any instant holds exactly a prefix of the writes: a consistent point must hold a prefix too (no later write
without every earlier one), which a copy read while the writes go on alone does not (the test fails with the
log after the copy left out). The copy goes out in several segments (SEGMENT made small), each its own stream.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import threading

from replicator.replication import cycle
from replicator.replication.cycle import split_ranges
from replicator.tracking.nbdclient import NbdClient

from ..daemon.primary_harness import MiB, Machine, replica_bytes

BLOCK, AREA = 4096, 8 * MiB
SLOTS = AREA // BLOCK
ORDER = random.Random(7).sample(range(SLOTS), SLOTS)     # write i goes to slot ORDER[i]


def block(i: int) -> bytes:
    return hashlib.shake_128(i.to_bytes(8, "little")).digest(BLOCK)


def test_split_ranges():
    assert split_ranges([], 10) == [[]]
    assert split_ranges([(0, 25)], 10) == [[(0, 10)], [(10, 10)], [(20, 5)]]
    assert split_ranges([(0, 4), (100, 8), (200, 3)], 10) == [[(0, 4), (100, 6)], [(106, 2), (200, 3)]]


class Writer(threading.Thread):
    def __init__(self, socket_path: str):
        super().__init__(daemon=True)
        self.client = NbdClient(socket_path, "d0.vhdx")
        self.acked, self.stop = 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.acked < SLOTS:
            self.client.pwrite(AREA + ORDER[self.acked] * BLOCK, block(self.acked))
            self.acked += 1


def prefix_length(image: bytes) -> int:
    """How many of the writes the image holds, checking they are a prefix (then zeros)."""
    def slot(i):
        at = AREA + ORDER[i] * BLOCK
        return image[at:at + BLOCK]
    k = 0
    while k < SLOTS and slot(k) == block(k):
        k += 1
    later = [i for i in range(k, SLOTS) if slot(i) != bytes(BLOCK)]
    assert not later, f"write {k} is missing but {len(later)} later writes are there: not one instant"
    return k


def _copy_under_writes(tmp_path, monkeypatch, resync: bool):
    monkeypatch.setattr(cycle, "SEGMENT", 2 * MiB)

    async def main():
        m = Machine(tmp_path, disks=(("d0.vhdx", 32),))
        writer = None
        try:
            if resync:
                assert [r.kind for r in await m.tick()] == ["initial"]
                await m.pm.request_resync()
            writer = Writer(m.pm.export.nbd_socket)
            writer.start()
            while writer.acked < 64:
                await asyncio.sleep(0.01)
            results = await m.tick()
            assert [r.kind for r in results] == ["resync" if resync else "initial"] and m.state == "Replicating"
            at_cut = writer.acked
            disk_id = str(m.pm.disks["d0.vhdx"].virtual_disk_id)
            image = await asyncio.to_thread(replica_bytes, tmp_path, disk_id)
            writer.stop.set()
            await asyncio.to_thread(writer.join)
            k = prefix_length(image)
            assert 64 <= k <= at_cut, (k, at_cut)
            if not resync:
                assert results[0].streams > 2          # several segments, then the log
            await m.tick()                               # the writes after the cut
            assert await m.replica_equals_primary()
        finally:
            if writer is not None:
                writer.stop.set()
                writer.join()
                writer.client.close()
            await m.close()
    asyncio.run(main())


def test_initial_copy_under_writes_is_one_instant(tmp_path, monkeypatch):
    _copy_under_writes(tmp_path, monkeypatch, resync=False)


def test_resync_under_writes_is_one_instant(tmp_path, monkeypatch):
    _copy_under_writes(tmp_path, monkeypatch, resync=True)


def test_outbox_keeps_only_streams_a_cycle_can_use(tmp_path):
    """Streams of copies cut short (a kill during an initial copy or a resync) are removed when the
    replicator starts; the streams of pending logs stay, to be resent byte for byte."""
    from replicator.replication.cycle import SPENT, DiskReplicator
    from replicator.targets.local import LocalTarget
    from ..tracking.helpers import make_vhdx, tracked
    import os
    import uuid

    t = tracked(make_vhdx(tmp_path / "d.vhdx", 8 * MiB))
    try:
        t.write(0, b"\x01" * 4096)
        sealed = t.cut()
        target = LocalTarget(str(tmp_path / "replica"))
        outbox = os.path.join(t.sidecar.dir, "outbox")
        os.makedirs(outbox, exist_ok=True)
        pending = f"{sealed.unique_id.hex}.delta"
        for name in (pending, SPENT, f"{uuid.uuid4().hex}.delta", f"{uuid.uuid4().hex}.delta"):
            with open(os.path.join(outbox, name), "wb") as f:
                f.write(b"x" * 1000)
        DiskReplicator(t, target)
        assert sorted(os.listdir(outbox)) == sorted([pending, SPENT])
    finally:
        t.close()

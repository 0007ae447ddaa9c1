"""A copy read from a running disk is held to its rate while the guest writes, and only then
(replication.pacing): the pacer's arithmetic on a clock of its own, then a real export and a real copy."""
from __future__ import annotations

import asyncio
import threading

import pytest

from replicator.replication.pacing import BUSY_HOLD, CopyPacer
from replicator.tracking.nbdclient import NbdClient

from ..daemon.primary_harness import MiB, Machine


class Clock:
    def __init__(self):
        self.now, self.slept = 100.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def _pacer(rate: int, counts: list):
    clock = Clock()
    return CopyPacer(rate, lambda: counts[0], clock=clock, sleep=clock.sleep), clock


def test_idle_guest_full_speed_writing_guest_held_to_the_rate():
    counts = [5]
    pace, clock = _pacer(10 * MiB, counts)
    for _ in range(3):                     # the guest does not write: no waiting at all
        clock.now += 0.01
        pace(MiB)
    assert clock.slept == [] and pace.slept == 0
    counts[0] = 6                          # it wrote: each MiB now takes 0.1 s, of which reading took 0.01
    clock.now += 0.01
    pace(MiB)
    assert clock.slept == [pytest.approx(0.09)]
    clock.now += 0.25                      # a chunk slower than the rate anyway: no sleep on top
    pace(MiB)
    assert clock.slept == [pytest.approx(0.09)]
    clock.now += 0.01                      # no new write, but within BUSY_HOLD of the last one seen
    pace(MiB)
    assert len(clock.slept) == 2 and pace.slept == pytest.approx(0.18)


def test_busy_ends_busy_hold_after_the_last_write_and_without_a_count_never_starts():
    counts = [1]
    pace, clock = _pacer(MiB, counts)
    pace(MiB)
    counts[0] = 2
    pace(MiB)
    assert len(clock.slept) == 1
    clock.now += BUSY_HOLD + 0.01
    pace(MiB)
    assert len(clock.slept) == 1           # the guest stopped writing a while ago
    counts[0] = None                       # no count (an export that does not report one): never held back
    for _ in range(3):
        pace(MiB)
    assert len(clock.slept) == 1
    off, off_clock = _pacer(0, [1])        # rate 0: no pacing
    off(MiB)
    assert off_clock.slept == []


class Rewriter(threading.Thread):
    """A guest that keeps writing one 4 KiB block every 2 ms until stopped (its log stays far below half
    the disk, where the tracker would give up the copy and ask for another)."""

    def __init__(self, socket_path: str):
        super().__init__(daemon=True)
        self.client, self.stop, self.writes = NbdClient(socket_path, "d0.vhdx"), threading.Event(), 0

    def run(self) -> None:
        while not self.stop.wait(0.002):
            self.client.pwrite(40 * MiB, self.writes.to_bytes(4, "little") * 1024)
            self.writes += 1


@pytest.mark.parametrize("writing", [True, False])
def test_an_initial_copy_is_held_back_only_while_the_guest_writes(tmp_path, writing):
    """6 MiB of data to copy at 2 MiB/s while the guest writes takes about 3 s, at least 1.5 of them held
    back (the count of the guest's writes comes with the export's map answers); with the guest quiet, none.
    Either way the replica then equals the disk."""
    async def main():
        m = Machine(tmp_path, 'copy_rate_when_busy = "2M"', disks=(("d0.vhdx", 64),))
        guest = NbdClient(m.pm.export.nbd_socket, "d0.vhdx")
        writer = Rewriter(m.pm.export.nbd_socket)
        try:
            for i in range(1, 6):
                guest.pwrite(i * 4 * MiB, bytes([i]) * MiB)
            if writing:
                writer.start()
                while writer.writes < 10:
                    await asyncio.sleep(0.01)
            results = await m.tick()
            assert [r.kind for r in results] == ["initial"]
            if writing:
                assert results[0].paced_seconds >= 1.5, results[0]
            else:
                assert results[0].paced_seconds == 0, results[0]
            writer.stop.set()
            if writing:
                await asyncio.to_thread(writer.join)
            await m.tick()
            assert await m.replica_equals_primary()
        finally:
            writer.stop.set()
            if writer.is_alive():
                writer.join()
            writer.client.close()
            guest.close()
            await m.close()
    asyncio.run(main())

"""A copy read from a running disk is held to its rate while the guest writes, and only then
(replication.pacing): the pacer's arithmetic on a clock of its own, then a real export and a real copy."""
from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from replicator.replication.pacing import BUSY_HOLD, POLL, CopyPacer
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


class Guest:
    """The export's view: when the guest last wrote (None: not since the export started)."""

    def __init__(self, clock: Clock):
        self.clock, self.last, self.asked = clock, None, []

    def quiet(self):
        self.asked.append(self.clock.now)
        return None if self.last is None else self.clock.now - self.last


def _pacer(rate: int):
    clock = Clock()
    guest = Guest(clock)
    return CopyPacer(rate, guest.quiet, clock=clock, sleep=clock.sleep), clock, guest


def test_idle_guest_full_speed_writing_guest_held_to_the_rate():
    pace, clock, guest = _pacer(10 * MiB)
    for _ in range(3):                     # the guest has not written: no waiting at all
        clock.now += POLL
        pace(MiB)
    guest.last = clock.now - 5             # it wrote long ago: still none
    clock.now += POLL
    pace(MiB)
    assert clock.slept == [] and pace.slept == 0
    guest.last = clock.now                 # it writes: each MiB now takes 0.1 s, of which reading took 0.01
    clock.now += POLL
    pace(MiB)
    clock.now += 0.01
    pace(MiB)
    assert clock.slept == [pytest.approx(0.09)]
    clock.now += 0.25                      # a chunk slower than the rate anyway: no sleep on top
    pace(MiB)
    assert clock.slept == [pytest.approx(0.09)]
    clock.now += 0.01                      # no new write, but within BUSY_HOLD of the last one
    pace(MiB)
    assert len(clock.slept) == 2 and pace.slept == pytest.approx(0.18)


def test_the_first_look_already_counts_and_busy_ends_busy_hold_after_the_last_write():
    """No baseline is needed: a copy shorter than POLL is held back from its first chunk when the guest
    writes (the export says when it last wrote, not how often)."""
    pace, clock, guest = _pacer(MiB)
    guest.last = clock.now - 0.1
    pace(MiB)
    assert len(clock.slept) == 1
    clock.now += BUSY_HOLD + POLL
    pace(MiB)
    assert len(clock.slept) == 1           # the guest stopped writing a while ago
    off, off_clock, off_guest = _pacer(0)  # rate 0: no pacing, and the export is not even asked
    off_guest.last = off_clock.now
    off(MiB)
    assert off_clock.slept == [] and off_guest.asked == []


def test_the_export_is_asked_at_most_every_poll_seconds():
    """Each look is a control call the export answers; a copy reads a chunk every few milliseconds."""
    pace, clock, guest = _pacer(MiB)
    for _ in range(100):
        clock.now += 0.01
        pace(4096)
    assert len(guest.asked) == 4           # at 100.01, 100.26, 100.51, 100.76
    assert all(b - a >= POLL for a, b in zip(guest.asked, guest.asked[1:]))


class GuestWriter(threading.Thread):
    """A guest writing through its own NBD connection every `every` seconds until stopped."""
    every = 0.002

    def __init__(self, socket_path: str):
        super().__init__(daemon=True)
        self.client, self.stop, self.writes = NbdClient(socket_path, "d0.vhdx"), threading.Event(), 0

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.write(self.writes)
            self.writes += 1

    async def finish(self) -> None:
        self.stop.set()
        if self.is_alive():
            await asyncio.to_thread(self.join)
        self.client.close()


class Rewriter(GuestWriter):
    """One 4 KiB block over and over (its log stays far below half the disk, where the tracker would give
    up the copy and ask for another)."""

    def write(self, i: int) -> None:
        self.client.pwrite(40 * MiB, i.to_bytes(4, "little") * 1024)


class Spreader(GuestWriter):
    """64 KiB blocks one after another over a 12 MiB region that held no data when the copy began: the copy
    reads few of them, the log written meanwhile holds them."""
    every = 0.01

    def write(self, i: int) -> None:
        self.client.pwrite(40 * MiB + (i % 192) * 65536, bytes([i % 251 + 1]) * 65536)


@contextlib.asynccontextmanager
async def machine_and_guest(tmp_path, rate: str, writer_class):
    m = Machine(tmp_path, f'copy_rate_when_busy = "{rate}"', disks=(("d0.vhdx", 64),))
    guest = NbdClient(m.pm.export.nbd_socket, "d0.vhdx")
    writer = writer_class(m.pm.export.nbd_socket)
    try:
        yield m, guest, writer
    finally:
        await writer.finish()
        guest.close()
        await m.close()


@pytest.mark.parametrize("writing", [True, False])
def test_an_initial_copy_is_held_back_only_while_the_guest_writes(tmp_path, writing):
    """6 MiB of data to copy at 2 MiB/s while the guest writes takes about 3 s, at least 1.5 of them held
    back (the pacer asks the export when the guest last wrote); with the guest quiet, none.
    Either way the replica then equals the disk."""
    async def main():
        async with machine_and_guest(tmp_path, "2M", Rewriter) as (m, guest, writer):
            for i in range(1, 6):
                guest.pwrite(i * 4 * MiB, bytes([i]) * MiB)
            if writing:
                writer.start()
                while writer.writes < 10:
                    await asyncio.sleep(0.01)
            else:                                   # quiet: the setup's writes are over a BUSY_HOLD ago
                await asyncio.sleep(BUSY_HOLD + 0.1)
            results = await m.tick()
            assert [r.kind for r in results] == ["initial"]
            if writing:
                assert results[0].paced_seconds >= 1.5, results[0]
            else:
                assert results[0].paced_seconds == 0, results[0]
            await writer.finish()
            await m.tick()
            assert await m.replica_equals_primary()
    asyncio.run(main())


def test_the_log_written_during_a_copy_goes_at_the_copys_pace_and_later_logs_do_not(tmp_path):
    """The log that makes a copy whole ships right after it as part of the same catching up, held to the
    same rate while the guest writes (shipped at full speed, it was a burst the guest waited behind). The
    logs of later cycles are not held back: a guest writing faster than the rate would outrun them."""
    rate = 4 * MiB

    async def main():
        async with machine_and_guest(tmp_path, str(rate), Spreader) as (m, guest, writer):
            guest.pwrite(4 * MiB, b"\x5a" * (8 * MiB))
            writer.start()
            results = await m.tick()
            assert [r.kind for r in results] == ["initial"]
            copied = 8 * MiB                                # and what the guest wrote before the copy began
            logged = results[0].plain_bytes - copied
            assert logged >= 4 * MiB, results[0]            # the log after the copy carried real work
            # held back for nearly all of copy and log at the rate; the copy alone would be about 2 s
            assert results[0].paced_seconds >= 0.8 * (copied + logged) / rate, results[0]
            later = await m.tick()
            assert later[0].kind == "delta" and later[0].plain_bytes > 0 and later[0].paced_seconds == 0
            await writer.finish()
            await m.tick()
            assert await m.replica_equals_primary()
    asyncio.run(main())


def test_a_copys_log_retried_after_a_failure_still_goes_at_the_copys_pace(tmp_path):
    """The link fails as the log after a copy is committed; the machine retries. The replica still has no
    consistent point, so the retried log is the copy's and goes at its pace; once it is applied, the
    replica equals the disk."""
    from replicator.targets.base import TargetUnavailable
    rate = 4 * MiB

    async def main():
        async with machine_and_guest(tmp_path, str(rate), Spreader) as (m, guest, writer):
            target = m.pm.replicators[0].target
            commit, calls = target.commit, []

            async def flaky_commit(disk_id, stream_id):
                calls.append(stream_id)
                if len(calls) == 2:                     # the copy's stream went; its log's does not
                    raise TargetUnavailable("the link dropped (injected)")
                return await commit(disk_id, stream_id)
            target.commit = flaky_commit
            guest.pwrite(4 * MiB, b"\x3c" * (4 * MiB))
            writer.start()
            with pytest.raises(TargetUnavailable):
                await m.tick()
            assert m.pm.replicators[0].tracker.state.sealed_logs      # the copy's log, still to ship
            results = []
            for _ in range(3):                          # the machine takes the initial replication up again
                out = await m.tick()
                if out:
                    results = out
                    break
            assert results and results[0].plain_bytes >= 2 * MiB, results
            assert results[0].paced_seconds >= 0.5 * results[0].plain_bytes / rate, results[0]
            await writer.finish()
            await m.tick()
            assert await m.replica_equals_primary()
    asyncio.run(main())

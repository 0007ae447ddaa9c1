"""The resync window on the scheduler's FakeClock: when a window opens, extra ticks at a chosen moment, and
a real machine (disks, trackers, local replica store) that waits outside its window, says until when,
resynchronizes inside it, and resynchronizes at once when an operator asks."""
from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from replicator.daemon.primary import Waiting
from replicator.orchestration import FakeClock, Scheduler, next_time_of_day, window_opens

from ..daemon.primary_harness import MiB, Machine, local_time

W = (dt.time(22, 0), dt.time(6, 0))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.mark.parametrize("now,opens", [
    ((2025, 6, 2, 12, 0), (2025, 6, 2, 22, 0)),          # before the window: tonight
    ((2025, 6, 2, 23, 30), (2025, 6, 2, 23, 30)),        # inside, before midnight: now
    ((2025, 6, 3, 5, 59), (2025, 6, 3, 5, 59)),          # inside, after midnight: now
    ((2025, 6, 3, 6, 0), (2025, 6, 3, 22, 0)),           # the window just closed: tonight again
])
def test_window_opens(now, opens):
    assert window_opens(W, local_time(*now)) == local_time(*opens)


def test_window_opens_without_a_window_and_inside_a_day_window():
    assert window_opens(None, 1234.5) == 1234.5
    day = (dt.time(1, 0), dt.time(3, 0))
    assert window_opens(day, local_time(2025, 6, 2, 3, 0)) == local_time(2025, 6, 3, 1, 0)
    assert window_opens(day, local_time(2025, 6, 2, 0, 59, 59)) == local_time(2025, 6, 2, 1, 0)


def test_next_time_of_day():
    at = dt.time(22, 0)
    assert next_time_of_day(at, local_time(2025, 6, 2, 21, 0)) == local_time(2025, 6, 2, 22, 0)
    assert next_time_of_day(at, local_time(2025, 6, 2, 22, 0)) == local_time(2025, 6, 2, 22, 0)
    assert next_time_of_day(at, local_time(2025, 6, 2, 22, 0, 1)) == local_time(2025, 6, 3, 22, 0)


def test_wake_adds_one_off_grid_tick_at_the_earliest_moment_asked():
    async def main():
        clock, calls = FakeClock(0.0), []

        async def cycle(machine, consistency):
            calls.append(clock.now())
            await clock.sleep(5)
        s = Scheduler(cycle, clock=clock)
        s.add("vm1", 900)
        s.start()
        await clock.advance(10)
        s.wake("vm1", 300)
        s.wake("vm1", 100)                  # earlier: wins
        s.wake("vm1", 200)                  # later than the one pending: ignored
        await clock.advance(1000)           # to 1010
        s.wake("vm1", 1802)                 # while the 1800 grid tick's cycle runs: nothing, and not missed
        s.wake("vm1", 2000)
        await clock.advance(1000)           # to 2010
        stats = s.stats("vm1")
        await s.stop(wait=False)
        return calls, stats

    calls, stats = run(main())
    assert calls == [0, 100, 900, 1800]
    assert stats["missed"] == 0 and stats["ticks"] == 3 and stats["wake_at"] is None


def test_wake_later_than_the_next_grid_tick_still_comes():
    async def main():
        clock, calls = FakeClock(0.0), []

        async def cycle(machine, consistency):
            calls.append(clock.now())
        s = Scheduler(cycle, clock=clock)
        s.add("vm1", 300)
        s.start()
        await clock.advance(1)
        s.wake("vm1", 450)
        await clock.advance(700)
        await s.stop(wait=False)
        return calls

    assert run(main()) == [0, 300, 450, 600]


async def overflow_log(m: Machine) -> None:
    """More than half the disk written in one log: the tracker requires a resynchronization (Hyper-V's trigger)."""
    await m.write("d0.vhdx", 2 * MiB, b"\x5a" * (9 * MiB))
    assert m.pm.disks["d0.vhdx"].resync_required


def test_automatic_resync_waits_for_its_window_then_runs(tmp_path):
    async def main():
        m = Machine(tmp_path, 'resync = "auto"\nresync_window = "22:00-06:00"', start=local_time(2025, 6, 2, 12))
        try:
            assert (await m.tick())[0].kind == "initial" and m.state == "Replicating"
            assert await m.replica_equals_primary()
            await overflow_log(m)
            assert await m.tick() is None                       # noon: outside the window
            assert m.state == "WaitingForStartResynchronize"
            assert "grew past 50%" in m.pm.state.reason
            assert "waits for its window 22:00-06:00 (starts 2025-06-02 22:00:00)" in m.pm.state.reason
            assert m.pm.due_at() == local_time(2025, 6, 2, 22)
            assert m.pm.status()["starts_at"] == local_time(2025, 6, 2, 22)
            assert m.pm.stats.to_dict(0)["health"] == "Critical"
            assert not await m.replica_equals_primary()
            m.set_time(local_time(2025, 6, 2, 21, 59, 59))
            assert await m.tick() is None and m.state == "WaitingForStartResynchronize"
            m.set_time(local_time(2025, 6, 2, 22))
            results = await m.tick()
            assert [r.kind for r in results] == ["resync"] and m.state == "Replicating"
            assert m.pm.due_at() is None
            assert await m.replica_equals_primary()
            kinds = [(j["kind"], j["state"]) for j in m.jobs.summaries()]
            assert kinds == [("initial", "succeeded"), ("resync", "succeeded")]
            resync = m.jobs.summaries()[-1]
            assert resync["bytes_done"] == resync["bytes_total"] > 0 and resync["percent"] == 100.0
            history = [h["to"] for h in m.pm.state.history]
            assert history[-3:] == ["WaitingForStartResynchronize", "Resynchronizing", "Replicating"]
        finally:
            await m.close()
    run(main())


def test_operator_resync_starts_at_once_outside_the_window(tmp_path):
    async def main():
        m = Machine(tmp_path, 'resync_window = "22:00-06:00"', start=local_time(2025, 6, 2, 9))
        try:
            await m.tick()
            await overflow_log(m)
            assert await m.tick() is None and m.state == "WaitingForStartResynchronize"
            job, task = await m.pm.begin("resync")
            await task
            assert job.state.value == "succeeded" and job.kind == "resync" and m.state == "Replicating"
            assert "resynchronization started by the operator" in [h["reason"] for h in m.pm.state.history]
            assert await m.replica_equals_primary()
            # asked while Replicating (nothing required): every disk is compared, the replica stays equal
            await m.write("d0.vhdx", 0, b"\x11" * 4096)
            job, task = await m.pm.begin("resync")
            assert m.state == "WaitingForStartResynchronize"
            await task
            assert job.state.value == "succeeded" and m.state == "Replicating"
            assert await m.replica_equals_primary()
        finally:
            await m.close()
    run(main())


def test_manual_resync_waits_for_the_operator(tmp_path):
    async def main():
        m = Machine(tmp_path, 'resync = "manual"', start=local_time(2025, 6, 2, 23))
        try:
            await m.tick()
            await overflow_log(m)
            assert await m.tick() is None
            assert m.state == "WaitingForStartResynchronize" and 'resync = "manual"' in m.pm.state.reason
            assert "replicator machine vm01 resync" in m.pm.state.reason and m.pm.due_at() is None
            m.set_time(local_time(2025, 6, 4, 2))
            assert await m.tick() is None and m.state == "WaitingForStartResynchronize"
            # an operator's cycle does not start a resynchronization: it says how to
            job, task = await m.pm.begin("cycle")
            await task
            assert job.state.value == "failed" and "replicator machine vm01 resync" in job.error
            with pytest.raises(Waiting):
                await m.pm.cycle_now()
            job, task = await m.pm.begin("resync")
            await task
            assert job.state.value == "succeeded" and m.state == "Replicating"
            assert await m.replica_equals_primary()
        finally:
            await m.close()
    run(main())

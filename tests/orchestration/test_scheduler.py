"""The scheduler on a fake clock: cycles on the grid, missed cycles counted, never two at once,
application-consistent cadence on hourly ticks, quiesce failures, pause and resume."""
from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from replicator.orchestration.quiesce import QuiesceFailed
from replicator.orchestration.scheduler import FakeClock, Scheduler, within_window


class Fixture:
    def __init__(self, duration=10.0, fail_at=()):
        self.clock = FakeClock(0.0)
        self.duration, self.fail_at = duration, set(fail_at)
        self.calls, self.cuts, self.ticks, self.missed, self.warnings = [], [], [], [], []
        self.active = self.max_active = 0

    async def run_cycle(self, machine, consistency):
        self.calls.append((machine, self.clock.now(), consistency))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.clock.sleep(self.duration)
            if self.clock.now() - self.duration in self.fail_at:
                raise RuntimeError("target unreachable")
            return {"bytes_sent": 1}
        finally:
            self.active -= 1

    async def cut(self, machine):
        self.cuts.append((machine, self.clock.now()))

    def scheduler(self, with_cut=False):
        return Scheduler(self.run_cycle, cut=self.cut if with_cut else None, clock=self.clock,
                         on_result=lambda t, r, e: self.ticks.append((t, r, e)),
                         on_missed=lambda m, when: self.missed.append((m, when)),
                         on_warning=lambda m, text: self.warnings.append((m, text)))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_cycles_run_on_the_grid():
    async def main():
        f = Fixture()
        s = f.scheduler()
        s.add("vm1", 300)
        s.add("vm2", 30, start=5)
        s.start()
        await f.clock.advance(1510)
        await s.stop(wait=False)
        return f, s

    f, s = run(main())
    assert [t for m, t, _ in f.calls if m == "vm1"] == [0, 300, 600, 900, 1200, 1500]
    assert [t for m, t, _ in f.calls if m == "vm2"] == [5 + 30 * k for k in range(51)]
    assert s.stats("vm1")["succeeded"] == 6 and s.stats("vm1")["missed"] == 0 and not f.missed
    assert all(c == "crash" for _, _, c in f.calls)


def test_a_cycle_still_running_at_the_next_tick_is_a_missed_cycle():
    async def main():
        f = Fixture(duration=700)
        s = f.scheduler()
        s.add("vm1", 300)
        s.start()
        await f.clock.advance(1800)
        await s.stop(wait=False)
        return f, s

    f, s = run(main())
    assert [t for _, t, _ in f.calls] == [0, 900, 1800]
    assert [when for _, when in f.missed] == [300, 600, 1200, 1500]
    assert s.stats("vm1")["missed"] == 4 and f.max_active == 1


def test_ticks_slept_through_count_as_missed():
    async def main():
        f = Fixture()
        s = f.scheduler()
        s.add("vm1", 300)
        s.start()
        await f.clock.advance(100)
        await f.clock.jump(1000)                  # the host was suspended: ticks 300 and 600 never ran
        await f.clock.advance(150)
        await s.stop()
        return f, s

    f, s = run(main())
    assert [t for _, t, _ in f.calls] == [0, 1100, 1200]   # the 900 slot runs late, at wake-up
    assert [t.scheduled for t, _, _ in f.ticks] == [0, 900, 1200]
    assert s.stats("vm1")["missed"] == 2


def test_failed_cycles_are_reported_and_the_schedule_goes_on():
    async def main():
        f = Fixture(fail_at={300})
        s = f.scheduler()
        s.add("vm1", 300)
        s.start()
        await f.clock.advance(910)
        await s.stop()
        return f, s

    f, s = run(main())
    outcomes = [(t.scheduled, t.ok, str(e) if e else None) for t, _, e in f.ticks]
    assert outcomes == [(0, True, None), (300, False, "target unreachable"), (600, True, None),
                        (900, True, None)]
    assert s.stats("vm1")["failed"] == 1


class FakeQuiesce:
    def __init__(self, fail_first=0, clock=None):
        self.fail_first, self.entered, self.exited = fail_first, 0, 0

    async def __aenter__(self):
        self.entered += 1
        if self.entered <= self.fail_first:
            raise QuiesceFailed("guest agent quiesce: freeze timed out after 10 s")
        return self

    async def __aexit__(self, *exc):
        self.exited += 1
        return False


def test_application_consistent_cadence_on_hourly_ticks():
    async def main():
        f = Fixture()
        s = f.scheduler(with_cut=True)
        q = FakeQuiesce()
        s.add("vm1", 300, app_consistent_hours=2, quiesce=q)
        s.start()
        await f.clock.advance(5 * 3600 + 10)
        await s.stop()
        return f, s, q

    f, s, q = run(main())
    app = [t.scheduled for t, _, _ in f.ticks if t.consistency == "application"]
    assert app == [3300, 10500, 17700]                # the last tick of hours 0, 2 and 4
    hourly = [t.scheduled for t, _, _ in f.ticks if t.hourly]
    assert hourly == [3600 * h - 300 for h in range(1, 6)]
    assert q.entered == q.exited == 3 and s.stats("vm1")["application"] == 3
    assert [c for _, t, c in f.calls if t in (3300, 3600)] == ["application", "crash"]
    assert len(f.cuts) == len(f.calls)               # the scheduler cut before every cycle


def test_failed_quiesce_gives_a_crash_consistent_point_a_warning_and_a_retry():
    async def main():
        f = Fixture()
        s = f.scheduler(with_cut=True)
        q = FakeQuiesce(fail_first=1)
        s.add("vm1", 900, app_consistent_hours=1, quiesce=q)
        s.start()
        await f.clock.advance(2 * 3600 + 10)
        await s.stop()
        return f, s, q

    f, s, q = run(main())
    wanted = [(t.scheduled, t.wanted, t.consistency) for t, _, _ in f.ticks if t.wanted == "application"]
    assert wanted == [(2700, "application", "crash"), (6300, "application", "application")]
    assert f.warnings == [("vm1", "guest agent quiesce: freeze timed out after 10 s; this point is "
                                  "crash-consistent")]
    assert s.stats("vm1")["quiesce_failures"] == 1 and s.stats("vm1")["succeeded"] == 9


def test_pause_and_resume():
    async def main():
        f = Fixture()
        s = f.scheduler()
        s.add("vm1", 300)
        s.start()
        await f.clock.advance(650)
        s.pause("vm1")
        await f.clock.advance(1000)                   # ticks 900, 1200, 1500 skipped, none missed
        assert s.stats("vm1")["paused"]
        s.resume("vm1")
        await f.clock.advance(300)
        await s.stop()
        return f, s

    f, s = run(main())
    assert [t for _, t, _ in f.calls] == [0, 300, 600, 1800]
    assert s.stats("vm1")["missed"] == 0 and not f.missed


def test_add_remove_and_validation():
    async def main():
        f = Fixture()
        s = f.scheduler()
        with pytest.raises(ValueError, match="take the cut"):
            s.add("vm1", 300, app_consistent_hours=1, quiesce=FakeQuiesce())
        s.start()
        s.add("vm1", 300)                              # added while running: starts ticking at once
        with pytest.raises(ValueError, match="already scheduled"):
            s.add("vm1", 300)
        await f.clock.advance(300)
        await s.remove("vm1")
        await f.clock.advance(910)
        await s.stop()
        return f

    f = run(main())
    assert [t for _, t, _ in f.calls] == [0, 300]


@pytest.mark.parametrize("window,hour,inside", [(None, 12, True), (("22:00", "06:00"), 23, True),
                                                (("22:00", "06:00"), 5, True), (("22:00", "06:00"), 6, False),
                                                (("22:00", "06:00"), 12, False), (("01:00", "03:00"), 2, True),
                                                (("01:00", "03:00"), 3, False)])
def test_resync_window(window, hour, inside):
    w = tuple(dt.time.fromisoformat(x) for x in window) if window else None
    assert within_window(w, dt.datetime(2025, 1, 1, hour, 0)) is inside


def test_a_failing_callback_does_not_stop_the_schedule(caplog):
    async def main():
        f = Fixture()

        def broken(tick, result, error):
            raise ValueError("callback bug")

        s = Scheduler(f.run_cycle, clock=f.clock, on_result=broken)
        s.add("vm1", 300)
        s.start()
        await f.clock.advance(610)
        await s.stop(wait=False)
        return f, s

    f, s = run(main())
    assert [t for _, t, _ in f.calls] == [0, 300, 600] and s.stats("vm1")["succeeded"] == 3
    assert "scheduler callback" in caplog.text

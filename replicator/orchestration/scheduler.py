"""The cycle scheduler: one cycle per machine every replication-frequency interval, on a fixed grid.

Hyper-V semantics: a tick that finds the machine's previous cycle still running does not start another, it
counts a *missed* cycle (ticks slept through, e.g. a suspended host, count too). A paused machine skips
its ticks without counting them.

Recovery points: the store keeps the last point of every hour, so the last tick of each hour is marked
`hourly`, and application-consistent points are taken on those ticks (every `app_consistent_hours`
hours), so that the point retained for the hour is the consistent one. For an application-consistent
point the scheduler takes the machine's cut itself (`cut(machine)`: one cut across all its disks) inside
the quiesce provider; a quiesce that fails or times out gives a crash-consistent point and a warning, and
the next hourly tick tries again. `run_cycle(machine, consistency)` then ships what the cut sealed.

A machine that waits for a moment -- its resync window opening (`window_opens`), a scheduled initial
replication (`next_time_of_day`) -- asks for one extra tick then (`wake`) instead of the next grid tick.

Time is injectable: FakeClock makes tests run hours of schedule in milliseconds.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import itertools
import logging
import time
from dataclasses import dataclass, field

from .quiesce import QuiesceFailed

HOUR = 3600
log = logging.getLogger(__name__)


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep_until(self, when: float) -> None:
        """Not before `when`: event loops may fire a timer a little early (uvloop rounds to milliseconds),
        and a machine woken for a moment must find the moment come."""
        await asyncio.sleep(max(0.0, when - time.time()))
        while (late := when - time.time()) > 0:
            await asyncio.sleep(late)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """Virtual time: sleepers wake only when a test calls `advance`, in time order."""

    def __init__(self, start: float = 0.0):
        self._now = float(start)
        self._sleepers: list = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep_until(self, when: float) -> None:
        if when <= self._now:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (when, next(self._seq), fut))
        await fut

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self._now + seconds)

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper at its own moment and letting the woken tasks run."""
        target = self._now + seconds
        await settle()                          # tasks just created get to their first sleep first
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, when)
            if not fut.done():
                fut.set_result(None)
                await settle()
        self._now = target
        await settle()

    async def jump(self, seconds: float) -> None:
        """Move time forward at once, as a suspended host does: sleepers wake late, at the new time."""
        self._now += seconds
        await self.advance(0)


async def settle(rounds: int = 50) -> None:
    """Let every ready task run until it blocks again (a few event-loop turns)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def within_window(window: tuple[dt.time, dt.time] | None, when: dt.datetime) -> bool:
    """Whether `when` falls in a daily window like 22:00-06:00 (None: any time). For automatic resync."""
    if window is None:
        return True
    start, end, t = window[0], window[1], when.time()
    return start <= t < end if start < end else (t >= start or t < end)


def next_time_of_day(at: dt.time, now: float) -> float:
    """The first moment at or after `now` (epoch seconds) whose local time of day is `at`."""
    here = dt.datetime.fromtimestamp(now)
    when = here.replace(hour=at.hour, minute=at.minute, second=at.second, microsecond=at.microsecond)
    if when < here:
        when += dt.timedelta(days=1)
    return when.timestamp()


def window_opens(window: tuple[dt.time, dt.time] | None, now: float) -> float:
    """When an automatic resync may start (epoch seconds): `now` inside the window (or without one), else
    the window's next opening. The window is local time of day, as operators write it."""
    if within_window(window, dt.datetime.fromtimestamp(now)):
        return now
    return next_time_of_day(window[0], now)


@dataclass
class Tick:
    machine: str
    seq: int
    scheduled: float
    wanted: str = "crash"             # what the schedule asked for
    consistency: str = "crash"        # what the cut achieved
    hourly: bool = False              # the last tick of its hour: its point is the one kept for the hour
    started: float | None = None
    finished: float | None = None
    ok: bool | None = None
    warning: str | None = None


@dataclass
class _Machine:
    name: str
    frequency: float
    app_consistent_hours: int = 0
    quiesce: object = None
    paused: bool = False
    next_tick: float = 0.0
    wake_at: float | None = None      # one extra, off-grid tick (a resync window opens, a scheduled start)
    seq: int = 0
    last_app_hour: int | None = None
    loop: asyncio.Task | None = None
    running: asyncio.Task | None = None
    counts: dict = field(default_factory=lambda: dict.fromkeys(
        ("ticks", "started", "succeeded", "failed", "missed", "application", "quiesce_failures"), 0))


class Scheduler:
    """Runs `run_cycle(machine, consistency)` on schedule. Callbacks (all optional, plain functions):
    on_result(tick, result, error), on_missed(machine, scheduled_time), on_warning(machine, text)."""

    def __init__(self, run_cycle, *, cut=None, clock=None, on_result=None, on_missed=None, on_warning=None):
        self.run_cycle, self.cut = run_cycle, cut
        self.clock = clock or SystemClock()
        self.on_result, self.on_missed, self.on_warning = on_result, on_missed, on_warning
        self.machines: dict[str, _Machine] = {}
        self.started = False

    # ------------------------------------------------------------------ machines
    def add(self, name: str, frequency: float, *, app_consistent_hours: int = 0, quiesce=None,
            start: float | None = None) -> None:
        """Schedule a machine; its first tick is at `start` (default: now)."""
        if name in self.machines:
            raise ValueError(f"machine {name!r} is already scheduled")
        if frequency <= 0:
            raise ValueError("frequency must be positive")
        if app_consistent_hours and self.cut is None:
            raise ValueError("application-consistent points need the scheduler to take the cut (cut=...)")
        first = self.clock.now() if start is None else start
        m = _Machine(name, float(frequency), app_consistent_hours, quiesce, next_tick=first)
        self.machines[name] = m
        if self.started:
            m.loop = asyncio.create_task(self._loop(m), name=f"schedule-{name}")

    async def remove(self, name: str) -> None:
        m = self.machines.pop(name)
        await _cancel(m.loop, m.running)

    def pause(self, name: str) -> None:
        self.machines[name].paused = True

    def resume(self, name: str) -> None:
        self.machines[name].paused = False

    def wake(self, name: str, when: float) -> None:
        """One extra tick at `when`, off the grid, for a machine that waits for a moment (its resync window
        opens, its initial replication is scheduled) rather than letting it wait for the next grid tick.
        The earliest request wins; a tick that finds the machine's cycle running does nothing."""
        m = self.machines[name]
        if m.wake_at is not None and m.wake_at <= when:
            return
        m.wake_at = when
        if self.started and m.loop is not None and not m.loop.done():   # asleep until its grid tick: re-arm
            m.loop.cancel()
            m.loop = asyncio.create_task(self._loop(m), name=f"schedule-{name}")

    def stats(self, name: str) -> dict:
        m = self.machines[name]
        return {**m.counts, "paused": m.paused, "running": bool(m.running and not m.running.done()),
                "next_tick": m.next_tick, "wake_at": m.wake_at}

    def start(self) -> None:
        """Start every machine's loop (call from inside the event loop)."""
        self.started = True
        for m in self.machines.values():
            if m.loop is None:
                m.loop = asyncio.create_task(self._loop(m), name=f"schedule-{m.name}")

    async def stop(self, wait: bool = True) -> None:
        """Stop ticking; with `wait` running cycles finish, else they are cancelled. (With a FakeClock,
        advance past running cycles first, or pass wait=False: nothing else moves its time.)"""
        self.started = False
        loops = [m.loop for m in self.machines.values() if m.loop]
        await _cancel(*loops)
        running = [m.running for m in self.machines.values() if m.running and not m.running.done()]
        if wait and running:
            await asyncio.gather(*running, return_exceptions=True)
        else:
            await _cancel(*running)
        for m in self.machines.values():
            m.loop = None

    async def wait_idle(self, name: str) -> None:
        """Wait for the machine's running cycle, if any (before a final cycle or a failover)."""
        m = self.machines[name]
        if m.running and not m.running.done():
            await asyncio.gather(m.running, return_exceptions=True)

    # ------------------------------------------------------------------ ticking
    async def _loop(self, m: _Machine) -> None:
        while True:
            if m.wake_at is not None and m.wake_at < m.next_tick:
                await self.clock.sleep_until(m.wake_at)
                m.wake_at = None
                self._extra_tick(m)
                continue
            await self.clock.sleep_until(m.next_tick)
            if m.wake_at is not None and m.wake_at <= self.clock.now():
                m.wake_at = None                  # this grid tick serves it
            late = int((self.clock.now() - m.next_tick) // m.frequency)
            if late > 0:                          # slept through ticks: each one is a missed cycle
                for _ in range(late if not m.paused else 0):
                    self._missed(m)
                m.next_tick += late * m.frequency
            self._tick(m)
            m.next_tick += m.frequency

    def _tick(self, m: _Machine) -> None:
        m.counts["ticks"] += 1
        if m.paused:
            return
        if m.running is not None and not m.running.done():
            self._missed(m)
            return
        m.seq += 1
        tick = Tick(m.name, m.seq, m.next_tick)
        hour = int(tick.scheduled // HOUR)
        tick.hourly = int((tick.scheduled + m.frequency) // HOUR) > hour
        if tick.hourly and m.app_consistent_hours and (
                m.last_app_hour is None or hour - m.last_app_hour >= m.app_consistent_hours):
            tick.wanted = "application"
        m.running = asyncio.create_task(self._cycle(m, tick), name=f"cycle-{m.name}-{m.seq}")

    def _extra_tick(self, m: _Machine) -> None:
        """An off-grid tick: not counted as a tick, and never a missed cycle when the machine is busy."""
        if m.paused or (m.running is not None and not m.running.done()):
            return
        m.seq += 1
        m.running = asyncio.create_task(self._cycle(m, Tick(m.name, m.seq, self.clock.now())),
                                        name=f"cycle-{m.name}-{m.seq}")

    def _missed(self, m: _Machine) -> None:
        m.counts["missed"] += 1
        self._callback(self.on_missed, m.name, m.next_tick)

    async def _cycle(self, m: _Machine, tick: Tick):
        tick.started = self.clock.now()
        m.counts["started"] += 1
        result = error = None
        try:
            if self.cut is not None:
                tick.consistency = await self._cut(m, tick)
            result = await self.run_cycle(m.name, tick.consistency)
            tick.ok = True
            m.counts["succeeded"] += 1
            if tick.consistency == "application":
                m.counts["application"] += 1
        except asyncio.CancelledError:
            raise
        except Exception as e:          # a failed cycle is reported, never stops the schedule
            error, tick.ok = e, False
            m.counts["failed"] += 1
        tick.finished = self.clock.now()
        self._callback(self.on_result, tick, result, error)
        return tick

    async def _cut(self, m: _Machine, tick: Tick) -> str:
        if tick.wanted != "application":
            await self.cut(m.name)
            return "crash"
        if m.quiesce is None:
            self._warn(m, tick, "no quiesce provider: this point is crash-consistent")
            await self.cut(m.name)
            return "crash"
        cut_done = False
        try:
            async with m.quiesce:
                await self.cut(m.name)
                cut_done = True
        except QuiesceFailed as e:
            m.counts["quiesce_failures"] += 1
            if not cut_done:
                self._warn(m, tick, f"{e}; this point is crash-consistent")
                await self.cut(m.name)
                return "crash"
            self._warn(m, tick, f"{e} (the cut was taken while frozen: the point is application-consistent)")
        m.last_app_hour = int(tick.scheduled // HOUR)
        return "application"

    def _warn(self, m: _Machine, tick: Tick, text: str) -> None:
        tick.warning = text
        self._callback(self.on_warning, m.name, text)

    @staticmethod
    def _callback(fn, *args) -> None:
        """A failing callback is logged; it must not stop the schedule."""
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            log.exception("scheduler callback %r failed", fn)


async def _cancel(*tasks) -> None:
    tasks = [t for t in tasks if t is not None and not t.done()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

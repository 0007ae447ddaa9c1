"""When a CPU of this machine ran nothing at all for a while (the host's freezes), over a timed step.

A kernel trace of the resync phase (2026-12-07 20:33-20:41, docs/performance.md) put each run's worst guest
completion inside a gap where no task was switched on either CPU for 17-20 ms while fio's timer was due: the
host had stopped a vCPU. /proc/stat's steal counts such time only in 10 ms ticks over a whole phase
(bench/hoststeal.py), not when it happened, so a phase's worst completion could not be told apart from one
we caused.

One watcher process per CPU, pinned there and SCHED_FIFO (it preempts any task of ours the moment its timer
fires), sleeps PERIOD at a time; waking LATE or more behind means that CPU ran nothing for that long: the
host took it, or the kernel ran with preemption off. Cost: 200 wake-ups a second per CPU, 0.73 % of it
(measured over 30 s). Without the right to SCHED_FIFO the watcher still runs but a busy CPU also makes it
late, and the report says so.

Run as a script it is the watcher itself: `cpufreeze.py --cpu N --out FILE`.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import numpy as np

PERIOD = 0.005      # the watcher's sleep (measured: 2 ms cost 2 % of each CPU, 5 ms 0.73 %)
LATE = 0.005        # a wake-up this much behind is a freeze; its start is known to within PERIOD


class Watch:
    """Watchers on every CPU this process may use, writing their freezes to files in `folder`."""

    def __init__(self, folder: str, period: float = PERIOD, late: float = LATE):
        self.folder, self.period, self.late = folder, period, late
        self.procs: list[subprocess.Popen] = []
        self.paths: list[str] = []
        self.realtime: bool | None = None

    def start(self) -> "Watch":
        os.makedirs(self.folder, exist_ok=True)
        for cpu in sorted(os.sched_getaffinity(0)):
            path = os.path.join(self.folder, f"freezes-cpu{cpu}.txt")
            if os.path.exists(path):
                os.unlink(path)
            self.paths.append(path)
            self.procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--cpu", str(cpu), "--out", path,
                 "--period", str(self.period), "--late", str(self.late), "--parent", str(os.getpid())],
                start_new_session=True))
        deadline = time.monotonic() + 10
        while not all(os.path.exists(p) for p in self.paths):      # each writes its header once it runs
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.stop()
                raise RuntimeError("the CPU freeze watchers did not start")
            time.sleep(0.01)
        self.realtime = True
        for path in self.paths:
            with open(path) as f:
                self.realtime = self.realtime and "SCHED_FIFO" in f.readline()
        return self

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []

    def freezes(self, t0: float = 0.0, t1: float = float("inf")) -> list[tuple[int, float, float]]:
        """(cpu, start, seconds) of every freeze that overlaps [t0, t1] (epoch seconds), oldest first."""
        out = []
        for path in self.paths:
            try:
                with open(path) as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for line in lines[1:]:
                fields = line.split()
                if len(fields) == 3:
                    cpu, start, seconds = int(fields[0]), float(fields[1]), float(fields[2])
                    if start < t1 and start + seconds > t0:
                        out.append((cpu, start, seconds))
        return sorted(out, key=lambda f: f[1])

    def __enter__(self) -> "Watch":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def union(freezes) -> list[tuple[float, float]]:
    """The time covered by any CPU's freeze, as sorted disjoint (start, end) intervals."""
    spans = sorted((s, s + d) for _, s, d in freezes)
    out: list[tuple[float, float]] = []
    for s, e in spans:
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def less_freezes(start: np.ndarray, lat: np.ndarray, freezes) -> np.ndarray:
    """Each I/O's latency less the part of its flight [start, start + lat] that some CPU spent frozen: an
    upper bound on what the host's freezes explain (the I/O may have been served on the other CPU
    meanwhile). The latencies are taken as given, not recomputed from epoch times (a float64 of 1.8e9 s
    holds them only to about 0.2 us), so with no freeze the result is the latency itself."""
    done, out = start + lat, lat
    for s, e in union(freezes):
        out = out - np.clip(np.minimum(done, e) - np.maximum(start, s), 0.0, None)
    return np.maximum(out, 0.0)


def _watch(cpu: int, out: str, period: float, late: float, parent: int = 0) -> None:
    """parent: the bench's pid; the watcher ends when that process is gone (killed, its cleanup not run)."""
    os.sched_setaffinity(0, {cpu})
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        policy = "SCHED_FIFO"
    except (PermissionError, OSError):
        policy = "SCHED_OTHER (no right to SCHED_FIFO: a busy CPU also makes it late)"
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with open(out + ".part", "w") as f:
        f.write(f"# cpu {cpu} {policy} period {period} late {late}\n")
    os.rename(out + ".part", out)
    with open(out, "a", buffering=1) as f:
        mono, wall, sleep = time.monotonic, time.time, time.sleep
        while not stop and (not parent or os.getppid() == parent):
            t = mono()
            sleep(period)
            lost = mono() - t - period
            if lost >= late:
                f.write(f"{cpu} {wall() - lost:.6f} {lost:.6f}\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--period", type=float, default=PERIOD)
    ap.add_argument("--late", type=float, default=LATE)
    ap.add_argument("--parent", type=int, default=0)
    a = ap.parse_args()
    _watch(a.cpu, a.out, a.period, a.late, a.parent)

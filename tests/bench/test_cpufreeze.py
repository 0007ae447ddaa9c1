"""bench/cpufreeze.py: the times a CPU ran nothing at all, and a worst completion less them."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from .helpers import ROOT, bench_module


def _module():
    return bench_module("cpufreeze")


def test_a_latency_loses_only_the_frozen_part_of_its_flight_counted_once():
    cf = _module()
    freezes = [(0, 10.0, 0.100), (1, 10.05, 0.100), (1, 20.0, 0.010)]      # CPU 1 overlaps CPU 0's freeze
    assert cf.union(freezes) == [(10.0, 10.15), (20.0, 20.01)]
    start = np.array([9.99, 10.10, 11.0, 19.995, 9.0])
    done = np.array([10.20, 10.12, 11.5, 20.02, 21.0])
    less = cf.less_freezes(start, done - start, freezes)
    assert np.allclose(less, [0.21 - 0.15, 0.0, 0.5, 0.025 - 0.01, 12.0 - 0.16])


def test_latencies_at_epoch_times_come_back_exactly_where_no_freeze_touches_them():
    """Completion times near 1.8e9 s hold a latency only to about 0.2 us: the worst completion less the
    freezes must never come out above the worst completion for that (the smoke test holds them to it)."""
    cf = _module()
    rnd = np.random.default_rng(1)
    lat = rnd.uniform(20e-6, 0.02, 100_000)
    start = 1_796_683_277.0 + np.sort(rnd.uniform(0, 30, lat.size))
    assert (cf.less_freezes(start, lat, []) == lat).all()
    frozen = cf.less_freezes(start, lat, [(0, start[500], 0.005)])
    assert (frozen <= lat).all() and (frozen >= 0).all() and (frozen < lat).any()


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs root here (the bench runs as root)")
def test_a_cpu_held_by_a_higher_realtime_task_shows_as_a_freeze_of_that_cpu_only():
    """A SCHED_FIFO task of a higher priority spinning 80 ms on one CPU keeps the watcher there from running,
    as the host stopping that vCPU would: the watcher reports a freeze of about that long on that CPU, inside
    the spin, and none as long on another."""
    cf = _module()
    cpu = min(os.sched_getaffinity(0))
    spin = ("import os, time\n"
            f"os.sched_setaffinity(0, {{{cpu}}})\n"
            "os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(2))\n"
            "t0 = time.time(); end = time.monotonic() + 0.08\n"
            "while time.monotonic() < end: pass\n"
            "print(t0, time.time())\n")
    with tempfile.TemporaryDirectory() as folder, cf.Watch(folder) as watch:
        assert watch.realtime
        time.sleep(0.2)
        out = subprocess.run([sys.executable, "-c", spin], capture_output=True, text=True, check=True).stdout
        t0, t1 = (float(x) for x in out.split())
        time.sleep(0.2)
        watch.stop()
        found = watch.freezes()
    mine = [f for f in found if f[0] == cpu and f[2] >= 0.05]
    assert mine, found
    _, start, seconds = max(mine, key=lambda f: f[2])
    assert seconds <= 0.08 + 0.02 and t0 - 0.01 <= start and start + seconds <= t1 + 0.01, (mine, t0, t1)
    assert not [f for f in found if f[0] != cpu and f[2] >= 0.05], found


def test_the_watchers_end_with_the_process_that_started_them(tmp_path):
    """A bench killed before its cleanup (SIGKILL, or SIGTERM's default) leaves no SCHED_FIFO watcher behind."""
    script = ("import sys, time\n"
              f"sys.path.insert(0, {os.path.join(ROOT, 'bench')!r})\n"
              "import cpufreeze\n"
              f"w = cpufreeze.Watch({str(tmp_path)!r}).start()\n"
              "print(' '.join(str(p.pid) for p in w.procs), flush=True)\n"
              "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in p.stdout.readline().split()]
    assert pids and all(os.path.exists(f"/proc/{pid}") for pid in pids)
    p.kill()
    p.wait()
    deadline = time.monotonic() + 5
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]

"""Scheduling of the export's threads: the thread serving the guest first, its helpers after it."""
from __future__ import annotations

import os
import threading

BACKGROUND_NICE = 5        # how much lower than the guest's I/O path its helper threads run


def background_priority() -> None:
    """Lower the calling thread's priority below the thread serving the guest (Linux nice values are per
    thread). Measured: at the same priority the export's helper threads, waking up, preempted its loop
    thread for 70 ms in a 20 s run, up to 7 ms at a time."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
    except (OSError, AttributeError):
        pass


def foreground_policy() -> None:
    """replicatord run as background work (chrt -b/-i, systemd's CPUSchedulingPolicy) hands its policy to
    the export it starts; the guest's requests are not background work. Every thread of the process made so
    far is reset (the policy is per thread), and those made later inherit the reset."""
    for tid in os.listdir("/proc/self/task"):
        try:
            if os.sched_getscheduler(int(tid)) in (os.SCHED_BATCH, os.SCHED_IDLE):
                os.sched_setscheduler(int(tid), os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass    # gone, or not permitted (leaving SCHED_IDLE needs root or RLIMIT_NICE room)

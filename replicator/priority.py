"""Scheduling: the export's thread serving the guest first, its helpers after it; replication on CPUs of its own."""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import struct
import threading

BACKGROUND_NICE = 5        # how much lower than the guest's I/O path its helper threads run
REPLICATION_NICE = 5      # replicatord's session behind the guests' sessions (its autogroup's nice value)
GUEST_SLICE_NS = 100_000   # the shortest slice Linux's EEVDF scheduler gives a thread (6.12 and later)
_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}.get(platform.machine()) if struct.calcsize("P") == 8 else None
MAX_CPUS = 8192            # the kernel's largest NR_CPUS
_started_on: frozenset[int] | None = None      # the CPUs replicatord was started with, while it is pinned


def background_priority() -> None:
    """Lower the calling thread's priority below the thread serving the guest (Linux nice values are per
    thread), with the scheduler's default slice (a thread inherits its creator's). Measured: at the same
    priority the export's helper threads, waking up, preempted its loop thread for 70 ms in a 20 s run, up to
    7 ms at a time."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
    except (OSError, AttributeError):
        pass
    _set_slice(0)


def guest_first(boost: int) -> None:
    """The calling thread serves the guest: ahead of replication's CPU work when the CPUs are short.
    - Its session's autogroup gets `boost` nice steps (root only). With sched_autogroup_enabled, on in most
      distributions' kernels, CPU time is shared between sessions first and nice values only count inside
      one; the export runs in a session of its own (it outlives replicatord), so its own nice value did
      nothing against replicatord's encoders.
    - The thread gets the shortest slice: waking up, it then preempts a running encoder instead of waiting
      for that one's slice to end (1.4 ms on 2 CPUs).
    Measured with two CPU-bound processes in other sessions on this 2-CPU machine, a thread waking every
    0.5 ms, p99.9 of its wake-up delay over 6 runs: median 3.9 ms as it was, 0.2 ms with the short slice,
    0.5 ms with the autogroup's nice -5, 0.3 ms with both (0.10-1.6)."""
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(boost))
    except OSError:
        pass        # no autogroups, or not permitted
    _set_slice(GUEST_SLICE_NS)


def autogroups_enabled() -> bool:
    """Whether a new session gets an autogroup of its own (kernel.sched_autogroup_enabled). Where it is off, a
    session stays in the root autogroup, whose /proc/PID/autogroup is empty and whose nice value cannot be
    set (EINVAL)."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def replication_behind_guests() -> bool:
    """replicatord's session yields the CPU to the guests' sessions: its autogroup at nice +5. With
    sched_autogroup_enabled, CPU time is shared between sessions first; QEMU runs in a session of its own
    (libvirt daemonizes it) and so does a service systemd starts, so replication's encoders and the replica's
    apply otherwise weigh as much as a guest's vCPUs. Only a session leader does this: started from a
    terminal, replicatord shares the terminal's session and is not to lower it. Its export processes are
    sessions of their own (guest_first). Lowering needs no privilege."""
    try:
        if os.getsid(0) != os.getpid() or not autogroups_enabled():
            return False
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(REPLICATION_NICE))
        return True
    except OSError:
        return False    # the root autogroup (sessions made before autogroups were enabled), or not permitted


def _set_slice(ns: int) -> None:
    """The calling thread's EEVDF slice (sched_setattr's sched_runtime for SCHED_OTHER; 0: the default).
    Older kernels ignore it."""
    try:
        if _SCHED_SETATTR is None or os.sched_getscheduler(0) != os.SCHED_OTHER:
            return
        nice = os.getpriority(os.PRIO_PROCESS, 0)
        # struct sched_attr: size, policy, flags, nice, priority, runtime, deadline, period, util_min, util_max
        attr = ctypes.create_string_buffer(struct.pack("=IIQiIQQQII", 56, os.SCHED_OTHER, 0, nice, 0, ns, 0, 0, 0, 0))
        ctypes.CDLL(None, use_errno=True).syscall(_SCHED_SETATTR, 0, attr, 0)
    except (OSError, AttributeError, ValueError):
        pass        # never in the way of the thread's work: a helper thread's initializer must not fail


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


def parse_cpu_list(text: str) -> frozenset[int]:
    """A CPU list as `taskset -c` and /sys/devices/system/cpu/online write it ("1", "0-3,8"). ValueError says
    why."""
    cpus: set[int] = set()
    for item in text.split(","):
        first, dash, last = item.strip().partition("-")
        if not (first.isascii() and first.isdigit() and (not dash or (last.isascii() and last.isdigit()))):
            raise ValueError(f"{text!r} is not a CPU list (like 1 or 0-3,8)")
        if len(first) > 4 or len(last) > 4:
            raise ValueError(f"{item.strip()!r} is not a range of CPUs 0-{MAX_CPUS - 1}")
        lo, hi = int(first), int(last) if dash else int(first)
        if lo > hi or hi >= MAX_CPUS:
            raise ValueError(f"{item.strip()!r} is not a range of CPUs 0-{MAX_CPUS - 1}")
        cpus.update(range(lo, hi + 1))
    return frozenset(cpus)


def cpu_list(cpus) -> str:
    """The short form of a set of CPUs ("0-3,8"), as parse_cpu_list reads it."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(c)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def allowed_cpus() -> frozenset[int]:
    """The CPUs replicatord may run on: those it was started with (its cgroup's, taskset's, systemd's
    CPUAffinity=), whatever replication_cpus later narrowed it to."""
    return _started_on if _started_on is not None else frozenset(os.sched_getaffinity(0))


def export_cpus() -> frozenset[int] | None:
    """The CPUs an export process started now is to run on, when replication is pinned (else None: it
    inherits replicatord's, which are then all of them)."""
    return _started_on


def check_replication_cpus(cpus: frozenset[int]) -> None:
    """ValueError unless replicatord may run on every one of `cpus`."""
    started = allowed_cpus()
    if not cpus <= started:
        raise ValueError(f"replicatord may run only on CPUs {cpu_list(started)}, not on {cpu_list(cpus - started)}")


def run_on(cpus) -> None:
    """Every thread of this process on `cpus` (affinity is per thread; those made later inherit it from their
    creator). Passes repeat until no new thread shows up: one not moved yet may have made another meanwhile.
    OSError when a thread cannot be moved (a CPU outside the process's cpuset)."""
    done: set[int] = set()
    while True:
        tids = {int(t) for t in os.listdir("/proc/self/task")} - done
        if not tids:
            return
        for tid in sorted(tids, key=lambda t: t != threading.get_native_id()):     # the caller first
            try:
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:
                pass    # ended meanwhile
        done |= tids


@contextlib.contextmanager
def guest_placement():
    """Processes started inside run where the guests run, not on replication's CPUs (a child inherits the
    affinity of the thread that starts it): an operator's scripts, such as the hooks that run while a guest is
    frozen or a recovery plan's actions. Nothing to do unless replicatord is pinned."""
    cpus = _started_on
    if cpus is None:
        yield
        return
    tid = threading.get_native_id()
    own = os.sched_getaffinity(tid)
    os.sched_setaffinity(tid, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(tid, own)


def pin_replication(cpus: frozenset[int] | None) -> None:
    """replicatord's threads on `cpus` (`replication_cpus`), or back on every CPU it was started with (None).
    Why: on a host with few cores, replication's encoders and the replica's apply delay the guest's requests
    by taking the CPU the export and the guest's vCPUs wake up on; on CPUs of their own they leave the others
    free (measured on 2 cores: p99.9 during an initial copy and a resync, docs/performance.md). The export
    processes it starts run on the CPUs replicatord was started with (export_cpus), not on these. DRBD's
    cpu-mask and libvirt's emulatorpin are the same idea."""
    global _started_on
    if cpus is None:
        if _started_on is not None:
            run_on(_started_on)
            _started_on = None
        return
    check_replication_cpus(cpus)
    started = allowed_cpus()
    if cpus == started:
        logging.getLogger("replicatord").warning(
            "replication_cpus names every CPU replicatord may run on (%s): replication is kept off none",
            cpu_list(cpus))
    run_on(cpus)
    _started_on = started

"""A process as /proc shows it, for tests that wait for one to end (or check it runs) or look at its
scheduling."""
from __future__ import annotations

import subprocess

from replicator import priority


def alive(pid: int) -> bool:
    """Running, not a zombie. A process reaped between any two looks reads as gone (ESRCH, ENOENT): a
    reaper thread may take it at any moment. The state follows the last ')' (a command name may hold one)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def sessions_get_autogroups() -> bool:
    """A new session has an autogroup of its own here, and the scheduler uses it. Not so where
    kernel.sched_autogroup_enabled is 0, nor in some CI sandboxes, where every process shows the root
    autogroup (an empty /proc/PID/autogroup)."""
    if not priority.autogroups_enabled():
        return False
    probe = subprocess.run(["cat", "/proc/self/autogroup"], capture_output=True, text=True, start_new_session=True)
    return probe.returncode == 0 and probe.stdout.strip() != ""


def autogroup_nice(pid: int) -> int:
    """The nice value of the process's autogroup; the root autogroup (an empty file) counts as 0."""
    with open(f"/proc/{pid}/autogroup") as f:          # "/autogroup-123 nice 5"
        words = f.read().split()
    return int(words[-1]) if words else 0

"""A process as /proc shows it, for tests that wait for one to end (or check it runs)."""
from __future__ import annotations


def alive(pid: int) -> bool:
    """Running, not a zombie. A process reaped between any two looks reads as gone (ESRCH, ENOENT): a
    reaper thread may take it at any moment. The state follows the last ')' (a command name may hold one)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

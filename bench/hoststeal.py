"""How much of the time the host took this machine's CPUs away (steal), over a timed step.

On a shared virtual machine the host runs other guests on our cores in bursts: a step timed during one can
take several times as long (rsync of the same change: 11 s quiet, 42 s in a burst), and both sides of a
ratio are not equally hit. Each timed step records its steal share, so a report can say which runs count.
"""
from __future__ import annotations

import contextlib

NOISY = 0.10        # a step with more than this share of stolen CPU time is not a fair measurement


def sample() -> tuple[int, int]:
    """(steal, total) jiffies over all CPUs since boot, from /proc/stat's "cpu" line."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    steal = fields[7] if len(fields) > 7 else 0
    return steal, sum(fields[:8])


def share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of CPU time stolen between two samples (0.0-1.0)."""
    steal, total = after[0] - before[0], after[1] - before[1]
    return round(steal / total, 3) if total > 0 else 0.0


@contextlib.contextmanager
def steal_share(into: dict, key: str = "steal"):
    """Put into[key] the share of CPU time stolen by the host during the block."""
    before = sample()
    try:
        yield
    finally:
        into[key] = share(before, sample())

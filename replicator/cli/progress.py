"""Progress on the command line: a one-line bar on stderr for local work (only when stderr is a terminal;
silent in logs and CI), and JobDisplay for a daemon's job (a bar on a terminal, plain lines otherwise)."""
from __future__ import annotations

import sys
import time

from ..orchestration.jobs import format_progress
from .common import human


class ProgressBar:
    def __init__(self, label: str = "", stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.label = label
        self.start = time.monotonic()
        self.drawn = False

    def __call__(self, name: str, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        frac = min(1.0, done / total)
        elapsed = time.monotonic() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0
        bar = "#" * int(frac * 30)
        self.stream.write(f"\r{self.label}{name} [{bar:<30}] {frac:6.1%} {human(done)} of {human(total)} "
                          f"ETA {eta:5.0f} s ")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        """End the bar's line; the next use (another cycle) starts a new one, with its own ETA."""
        if self.drawn:
            self.stream.write("\n")
        self.drawn, self.start = False, time.monotonic()


class JobDisplay:
    """Shows a replicatord job as it runs, from its summaries (`GET /v1/jobs/ID`): on a terminal one line
    redrawn in place; otherwise a line per new log entry and per 10 % of progress, so logs stay short."""

    def __init__(self, stream=None, *, every: float = 30.0):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every = every
        self.seen: dict[str, list] = {}           # job id -> [log entries shown, last 10 % step, time shown]

    def update(self, job: dict, final: bool = False) -> None:
        seen = self.seen.setdefault(job["id"], [0, None, 0.0])
        log = job.get("log") or []
        count = job.get("log_count", len(log))
        new = log[len(log) - min(len(log), max(0, count - seen[0])):]
        seen[0] = count
        line = f"{job['id']} {format_progress(job)}"
        erase = "\r\x1b[K" if self.tty else ""
        for entry in new:
            self.stream.write(f"{erase}{job['id']}: {entry['text']}\n")
        if self.tty:
            self.stream.write(f"\r\x1b[K{line}" + ("\n" if final else ""))
        else:
            step = int(job["percent"] // 10) if job.get("percent") is not None else None
            if final or step != seen[1] or time.monotonic() - seen[2] >= self.every:
                self.stream.write(line + "\n")
                seen[1], seen[2] = step, time.monotonic()
        self.stream.flush()

    def close(self, job: dict) -> None:
        """The job's last state, on a line of its own."""
        self.update(job, final=True)

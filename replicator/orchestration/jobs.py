"""Jobs: long operations (initial replication, resync, failover, recovery plans) with progress that
`status` and the admin API can show -- bytes, percent, rate and ETA -- and a log of what happened.

The registry keeps job summaries in STATE_DIR/jobs.json (atomic writes) so `status` still shows the
recent jobs after a restart; a job that was running when the daemon stopped is marked failed
("interrupted"), and the machine's state tells the daemon to start it again.
"""
from __future__ import annotations

import collections
import json
import os
import time
from enum import Enum

from ..errors import UsageError
from .states import write_json_atomic

RATE_WINDOW = 30.0          # seconds of progress samples the rate (and so the ETA) is computed from
KEEP_FINISHED = 100
SAVE_INTERVAL = 5.0         # progress is saved at most this often; state changes are saved at once


class JobState(str, Enum):
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class Job:
    def __init__(self, job_id: str, kind: str, subject: str = "", *, total: int | None = None,
                 clock=time.time, on_change=None):
        self.id, self.kind, self.subject, self.clock = job_id, kind, subject, clock
        self.state = JobState.running
        self.created = self.updated = clock()
        self.finished: float | None = None
        self.bytes_done, self.bytes_total = 0, total
        self.error: str | None = None
        self.cancel_requested = False
        self.log: list[dict] = []
        self._samples: collections.deque = collections.deque([(self.created, 0)])
        self._on_change = on_change

    # ------------------------------------------------------------------ progress
    def progress(self, done: int, total: int | None = None) -> None:
        now = self.clock()
        self.bytes_done = done
        if total is not None:
            self.bytes_total = total
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()
        self.updated = now
        self._changed(urgent=False)

    def add(self, n: int) -> None:
        self.progress(self.bytes_done + n)

    @property
    def percent(self) -> float | None:
        if not self.bytes_total:
            return 100.0 if self.state is JobState.succeeded else None
        return min(100.0, 100.0 * self.bytes_done / self.bytes_total)

    def rate(self) -> float | None:
        """Bytes per second over the last RATE_WINDOW seconds of progress."""
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None

    def eta(self) -> float | None:
        """Seconds left at the recent rate; None when unknown (no total, no progress yet)."""
        if self.state is not JobState.running or not self.bytes_total:
            return None
        rate = self.rate()
        if not rate or rate <= 0:
            return None
        return max(0.0, (self.bytes_total - self.bytes_done) / rate)

    # ------------------------------------------------------------------ log and end
    def note(self, text: str, level: str = "info") -> dict:
        entry = {"time": self.clock(), "level": level, "text": text}
        self.log.append(entry)
        self._changed(urgent=False)
        return entry

    def succeed(self, text: str = "") -> None:
        self._finish(JobState.succeeded, None, text or "succeeded")

    def fail(self, error) -> None:
        self._finish(JobState.failed, str(error) or type(error).__name__, f"failed: {error}")

    def cancel(self) -> None:
        """Ask the operation to stop (it checks cancel_requested) -- it calls cancelled() when it has."""
        self.cancel_requested = True
        self.note("cancel requested")

    def cancelled(self) -> None:
        self._finish(JobState.cancelled, None, "cancelled")

    def _finish(self, state: JobState, error: str | None, text: str) -> None:
        if self.state is not JobState.running:
            raise UsageError(f"job {self.id} already {self.state.value}")
        self.state, self.error, self.finished = state, error, self.clock()
        self.log.append({"time": self.finished, "level": "error" if error else "info", "text": text})
        self._changed(urgent=True)

    def _changed(self, urgent: bool) -> None:
        if self._on_change:
            self._on_change(self, urgent)

    def summary(self, log_lines: int = 20) -> dict:
        return {"id": self.id, "kind": self.kind, "subject": self.subject, "state": self.state.value,
                "created": self.created, "updated": self.updated, "finished": self.finished,
                "bytes_done": self.bytes_done, "bytes_total": self.bytes_total, "percent": self.percent,
                "rate": self.rate(), "eta": self.eta(), "error": self.error, "log": self.log[-log_lines:],
                "log_count": len(self.log)}


def format_progress(job: Job | dict, width: int = 30) -> str:
    """One line for the CLI: `resync web1 [#######.......] 45.0% 1.2 GiB/2.6 GiB 35.0 MiB/s ETA 0:40`."""
    s = job.summary() if isinstance(job, Job) else job
    pct = s.get("percent")
    bar = "#" * int((pct or 0) / 100 * width)
    parts = [f"{s['kind']} {s['subject']}".strip(), f"[{bar:<{width}}]",
             f"{pct:5.1f}%" if pct is not None else "  ?  %", _size(s["bytes_done"])
             + (f"/{_size(s['bytes_total'])}" if s.get("bytes_total") else "")]
    if s.get("rate"):
        parts.append(f"{_size(s['rate'])}/s")
    if s["state"] != "running":
        parts.append(s["state"])
    elif s.get("eta") is not None:
        m, sec = divmod(int(s["eta"] + 0.5), 60)
        parts.append(f"ETA {m // 60}:{m % 60:02d}:{sec:02d}" if m >= 60 else f"ETA {m}:{sec:02d}")
    return " ".join(parts)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class PartsProgress:
    """One job's progress from several parts (a machine's disks), each reporting `(done, total)` for one
    stream after another: a stream is over once it reported done == total (or restarts lower), and the
    next report of that part begins its next stream. Parts that have not reported yet count with an
    estimate, so the total is meaningful from the start; `settle()` drops estimates no stream replaced."""

    def __init__(self, job: Job, estimates: dict[str, int] | None = None):
        self.job = job
        self.estimates = dict(estimates or {})
        self.finished: dict[str, list[int]] = {}        # part -> [done, total] of its ended streams
        self.current: dict[str, tuple[int, int]] = {}   # part -> (done, total) of its stream in flight
        if self.estimates:
            self._report()

    def update(self, part: str, done: int, total: int) -> None:
        cur = self.current.get(part)
        if cur is not None and (cur[0] >= cur[1] or done < cur[0]):
            ended = self.finished.setdefault(part, [0, 0])
            ended[0] += cur[0]
            ended[1] += cur[1]
        self.current[part] = (done, total)
        self.estimates.pop(part, None)
        self._report()

    def estimate(self, estimates: dict[str, int]) -> None:
        """Guesses for the parts that have not reported yet."""
        self.estimates.update({k: v for k, v in estimates.items() if k not in self.current})
        self._report()

    def settle(self) -> None:
        self.estimates.clear()
        self._report()

    def _report(self) -> None:
        parts = (*self.finished.values(), *self.current.values())
        done = sum(p[0] for p in parts)
        self.job.progress(done, sum(p[1] for p in parts) + sum(self.estimates.values()))


class JobRegistry:
    """All jobs of this daemon; summaries persisted to STATE_DIR/jobs.json."""

    def __init__(self, state_dir: str | None, *, clock=time.time, keep_finished: int = KEEP_FINISHED):
        self.path = os.path.join(state_dir, "jobs.json") if state_dir else None
        self.clock, self.keep_finished = clock, keep_finished
        self.jobs: dict[str, Job] = {}
        self.previous: list[dict] = []          # summaries from before the restart
        self._next = 1
        self._saved_at = 0.0
        self._load()

    def create(self, kind: str, subject: str = "", total: int | None = None) -> Job:
        job = Job(f"job-{self._next:05d}", kind, subject, total=total, clock=self.clock, on_change=self._changed)
        self._next += 1
        self.jobs[job.id] = job
        job.note(f"{kind} {subject} started".replace("  ", " "))
        self.save()
        return job

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise UsageError(f"no job {job_id!r}")
        return self.jobs[job_id]

    def find(self, job_id: str, log_lines: int = 20) -> dict:
        """The summary of a job of this run or of one from before the restart."""
        if job_id in self.jobs:
            return self.jobs[job_id].summary(log_lines)
        for s in self.previous:
            if s.get("id") == job_id:
                return s
        raise UsageError(f"no job {job_id!r} (known: {', '.join(s['id'] for s in self.summaries()[-5:]) or 'none'})")

    def summaries(self) -> list[dict]:
        return self.previous + [j.summary() for j in self.jobs.values()]

    def running(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.state is JobState.running]

    def _changed(self, job: Job, urgent: bool) -> None:
        if urgent or self.clock() - self._saved_at >= SAVE_INTERVAL:
            self.save()

    def save(self) -> None:
        self._saved_at = self.clock()
        if not self.path:
            return
        finished = [s for s in self.summaries() if s["state"] != "running"][-self.keep_finished:]
        running = [s for s in self.summaries() if s["state"] == "running"]
        write_json_atomic(self.path, {"next": self._next, "jobs": finished + running})

    def _load(self) -> None:
        if not self.path or not os.path.exists(self.path):
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            self._next, jobs = int(data["next"]), list(data["jobs"])
        except (OSError, ValueError, KeyError, TypeError):
            os.replace(self.path, self.path + ".corrupt")    # keep it for a look; start a fresh list
            return
        for s in jobs:
            if s.get("state") == "running":
                s.update(state="failed", error="interrupted: the daemon stopped while the job ran", eta=None)
        self.previous = sorted(jobs, key=lambda s: s.get("created") or 0)

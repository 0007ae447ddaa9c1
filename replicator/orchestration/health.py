"""Replication health per machine: the statistics Hyper-V Replica's Measure-VMReplication reports, its
Normal / Warning / Critical rules, and the same numbers in Prometheus' text format.

The statistics window runs from when monitoring started or was last reset (`reset`), as in Hyper-V; the
Prometheus counters (`*_total`) are never reset, since Prometheus expects counters only to grow.
Rules: Critical when the last cycle failed or a resynchronization is required; Warning when more than
20 % of the window's cycles were missed, or nothing replicated for more than an hour (ASR's RPO threshold:
`rpo_threshold`, an hour by default); else Normal.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum

MISSED_WARNING_PERCENT = 20
STALE_AFTER = 3600.0


class Health(str, Enum):
    Normal = "Normal"
    Warning = "Warning"
    Critical = "Critical"


HEALTH_VALUES = {Health.Normal: 0, Health.Warning: 1, Health.Critical: 2}


@dataclass
class HealthReport:
    level: Health
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"health": self.level.value, "reasons": list(self.reasons)}


class MachineStats:
    """Accumulates one machine's cycle outcomes. Times are wall-clock seconds (time.time())."""

    def __init__(self, machine: str, rpo_target: float, *, clock=time.time, labels: dict | None = None,
                 stale_after: float = STALE_AFTER):
        """labels: added to the machine's Prometheus samples (relationship="Extended" for an extended leg);
        stale_after: the RPO threshold, seconds without a replicated cycle before health turns Warning."""
        self.machine, self.rpo_target, self.clock = machine, float(rpo_target), clock
        self.stale_after = float(stale_after)
        self.labels = dict(labels or {})
        self.monitoring_start = clock()
        self.last_replication_time: float | None = None   # the cut of the last successful cycle
        self.last_cycle_failed = False
        self.last_error: str | None = None
        self.last_error_time: float | None = None
        self.resync_required = False
        self.pending_bytes = 0
        self.totals = {"success": 0, "failed": 0, "missed": 0, "bytes": 0, "errors": 0}
        self.reset()

    _KEPT = ("monitoring_start", "last_replication_time", "last_cycle_failed", "last_error", "last_error_time",
             "totals", "window_start", "successful", "failed", "missed", "errors", "size_sum", "size_max",
             "latency_sum", "latency_max", "_rpo_max")

    def snapshot(self) -> dict:
        """What survives a restart of the daemon (Hyper-V keeps its statistics until they are reset)."""
        return {k: getattr(self, k) for k in self._KEPT}

    def restore(self, saved: dict) -> None:
        for k in self._KEPT:
            if k in saved:
                setattr(self, k, dict(saved[k]) if k == "totals" else saved[k])

    def reset(self) -> None:
        """Start a new statistics window (Hyper-V's Reset-VMReplicationStatistics)."""
        self.window_start = self.clock()
        self.successful = self.failed = self.missed = self.errors = 0
        self.size_sum = self.size_max = 0
        self.latency_sum = self.latency_max = 0.0
        self._rpo_max = 0.0

    # ------------------------------------------------------------------ recording
    def record_success(self, bytes_sent: int, seconds: float, cut_time: float | None = None) -> None:
        """A cycle committed: `bytes_sent` is its replication size, `seconds` its latency, `cut_time` the
        moment its data is from (defaults to now)."""
        cut_time = self.clock() if cut_time is None else cut_time
        previous = self.last_replication_time if self.last_replication_time is not None else self.window_start
        self._rpo_max = max(self._rpo_max, cut_time - max(previous, self.window_start))
        self.last_replication_time = max(cut_time, self.last_replication_time or cut_time)
        self.successful += 1
        self.size_sum += bytes_sent
        self.size_max = max(self.size_max, bytes_sent)
        self.latency_sum += seconds
        self.latency_max = max(self.latency_max, seconds)
        self.last_cycle_failed = False
        self.totals["success"] += 1
        self.totals["bytes"] += bytes_sent

    def record_result(self, result, cut_time: float | None = None) -> None:
        """A CycleResult (or a list of them, one per disk: sizes add, the slowest disk is the latency)."""
        results = result if isinstance(result, (list, tuple)) else [result]
        self.record_success(sum(r.bytes_sent for r in results), max((r.seconds for r in results), default=0.0),
                            cut_time)

    def record_failure(self, error) -> None:
        self.failed += 1
        self.errors += 1
        self.last_cycle_failed = True
        self.last_error = str(error) or type(error).__name__
        self.last_error_time = self.clock()
        self.totals["failed"] += 1
        self.totals["errors"] += 1

    def record_missed(self, count: int = 1) -> None:
        self.missed += count
        self.totals["missed"] += count

    # ------------------------------------------------------------------ derived
    @property
    def cycles(self) -> int:
        return self.successful + self.failed + self.missed

    def achieved_rpo(self, now: float | None = None) -> float | None:
        """How old the newest replicated data is: time since the last successful cycle's cut."""
        if self.last_replication_time is None:
            return None
        return max(0.0, (self.clock() if now is None else now) - self.last_replication_time)

    def max_rpo(self, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        since = self.last_replication_time if self.last_replication_time is not None else self.window_start
        return max(self._rpo_max, now - max(since, self.window_start))

    def health(self, now: float | None = None) -> HealthReport:
        now = self.clock() if now is None else now
        critical, warning = [], []
        if self.last_cycle_failed:
            critical.append(f"the last cycle failed: {self.last_error}")
        if self.resync_required:
            critical.append("resynchronization required")
        if self.cycles and self.missed * 100 > MISSED_WARNING_PERCENT * self.cycles:
            warning.append(f"{self.missed} of {self.cycles} cycles missed "
                           f"({100 * self.missed / self.cycles:.0f} % > {MISSED_WARNING_PERCENT} %)")
        since = self.last_replication_time if self.last_replication_time is not None else self.monitoring_start
        if now - since > self.stale_after:
            what = "no successful replication" if self.last_replication_time is None else "nothing replicated"
            warning.append(f"{what} for {_span(now - since)} (over the RPO threshold of {_span(self.stale_after)})")
        if critical:
            return HealthReport(Health.Critical, critical + warning)
        return HealthReport(Health.Warning if warning else Health.Normal, warning)

    def to_dict(self, now: float | None = None) -> dict:
        now = self.clock() if now is None else now
        report = self.health(now)
        return {
            "machine": self.machine, "health": report.level.value, "health_reasons": report.reasons,
            "window_start": self.window_start, "monitoring_start": self.monitoring_start,
            "successful_cycles": self.successful, "failed_cycles": self.failed, "missed_cycles": self.missed,
            "errors": self.errors, "last_error": self.last_error, "last_error_time": self.last_error_time,
            "average_size": self.size_sum / self.successful if self.successful else 0, "maximum_size": self.size_max,
            "average_latency": self.latency_sum / self.successful if self.successful else 0.0,
            "maximum_latency": self.latency_max, "pending_size": self.pending_bytes,
            "last_replication_time": self.last_replication_time, "achieved_rpo": self.achieved_rpo(now),
            "maximum_rpo": self.max_rpo(now), "rpo_target": self.rpo_target,
            "resync_required": self.resync_required, "totals": dict(self.totals)}


# ---------------------------------------------------------------------------------------------- Prometheus
def _avg(total, n):
    return total / n if n else 0


_METRICS = [
    # name, type, help, value(stats, now) -> number | None | list[(extra labels, number)]
    ("replicator_health", "gauge", "Replication health: 0 Normal, 1 Warning, 2 Critical.",
     lambda s, now: HEALTH_VALUES[s.health(now).level]),
    ("replicator_cycles_total", "counter", "Replication cycles since the daemon started, by result.",
     lambda s, now: [({"result": k}, s.totals[k]) for k in ("success", "failed", "missed")]),
    ("replicator_errors_total", "counter", "Replication errors since the daemon started.",
     lambda s, now: s.totals["errors"]),
    ("replicator_replicated_bytes_total", "counter", "Bytes replicated since the daemon started.",
     lambda s, now: s.totals["bytes"]),
    ("replicator_window_cycles", "gauge", "Cycles in the statistics window, by result.",
     lambda s, now: [({"result": "success"}, s.successful), ({"result": "failed"}, s.failed),
                     ({"result": "missed"}, s.missed)]),
    ("replicator_replication_size_average_bytes", "gauge", "Average replication size in the window.",
     lambda s, now: _avg(s.size_sum, s.successful)),
    ("replicator_replication_size_maximum_bytes", "gauge", "Maximum replication size in the window.",
     lambda s, now: s.size_max),
    ("replicator_replication_latency_average_seconds", "gauge", "Average cycle duration in the window.",
     lambda s, now: _avg(s.latency_sum, s.successful)),
    ("replicator_replication_latency_maximum_seconds", "gauge", "Maximum cycle duration in the window.",
     lambda s, now: s.latency_max),
    ("replicator_pending_bytes", "gauge", "Changed bytes tracked but not replicated yet.",
     lambda s, now: s.pending_bytes),
    ("replicator_last_replication_timestamp_seconds", "gauge", "Cut time of the last successful cycle.",
     lambda s, now: s.last_replication_time),
    ("replicator_rpo_seconds", "gauge", "Achieved RPO: age of the newest replicated data.",
     lambda s, now: s.achieved_rpo(now)),
    ("replicator_rpo_maximum_seconds", "gauge", "Largest achieved RPO in the window.",
     lambda s, now: s.max_rpo(now)),
    ("replicator_rpo_target_seconds", "gauge", "RPO target: the replication frequency.",
     lambda s, now: s.rpo_target),
    ("replicator_resync_required", "gauge", "1 when a resynchronization is required.",
     lambda s, now: int(s.resync_required)),
]


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _number(v) -> str:
    if isinstance(v, bool) or isinstance(v, int):
        return str(int(v))
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _sample(name: str, labels: dict, value) -> str:
    inner = ",".join(f"{k}=\"{_label(v)}\"" for k, v in labels.items())
    return f"{name}{{{inner}}} {_number(value)}"


def render_prometheus(stats, now: float | None = None, states: dict[str, str] | None = None) -> str:
    """Text exposition format (version 0.0.4) for every machine; `states` adds replicator_machine_state."""
    machines = sorted(stats.values() if isinstance(stats, dict) else stats, key=lambda s: s.machine)
    lines = []
    for name, kind, help_text, value in _METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for s in machines:
            t = s.clock() if now is None else now
            v = value(s, t)
            for extra, number in (v if isinstance(v, list) else [({}, v)]):
                if number is not None:
                    lines.append(_sample(name, {"machine": s.machine, **s.labels, **extra}, number))
    if states is not None:
        lines += ["# HELP replicator_machine_state The machine's replication state (1 for the current one).",
                  "# TYPE replicator_machine_state gauge"]
        lines += [_sample("replicator_machine_state", {"machine": m, "state": st}, 1)
                  for m, st in sorted(states.items())]
    return "\n".join(lines) + "\n"


def _span(seconds: float) -> str:
    return f"{seconds / 60:.0f} minutes" if seconds >= 120 else f"{seconds:.0f} seconds"

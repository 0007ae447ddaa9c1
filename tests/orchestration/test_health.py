"""Health statistics and rules at their boundaries, and Prometheus text output checked line by line."""
from __future__ import annotations

import json
import re

import pytest

from replicator.orchestration.health import Health, MachineStats, render_prometheus
from replicator.replication.cycle import CycleResult


class Clock:
    def __init__(self, t=100_000.0):
        self.t = t

    def __call__(self):
        return self.t


def stats(freq=300):
    clock = Clock()
    return MachineStats("vm1", freq, clock=clock), clock


def test_statistics_accumulate():
    s, clock = stats()
    for size, secs in ((100, 2.0), (300, 4.0)):
        clock.t += 300
        s.record_success(size, secs, cut_time=clock.t - secs)
    clock.t += 300
    s.record_failure(RuntimeError("target unreachable"))
    s.record_missed(2)
    s.pending_bytes = 4096
    d = s.to_dict()
    assert (d["successful_cycles"], d["failed_cycles"], d["missed_cycles"], d["errors"]) == (2, 1, 2, 1)
    assert (d["average_size"], d["maximum_size"]) == (200, 300)
    assert (d["average_latency"], d["maximum_latency"]) == (3.0, 4.0)
    assert d["last_error"] == "target unreachable" and d["pending_size"] == 4096
    assert d["last_replication_time"] == clock.t - 304 and d["achieved_rpo"] == 304
    assert d["rpo_target"] == 300 and d["maximum_rpo"] == 304
    json.dumps(d)


def test_record_result_from_cycle_results():
    s, clock = stats()
    s.record_result([CycleResult(bytes_sent=10, seconds=1.5), CycleResult(bytes_sent=20, seconds=0.5)])
    assert (s.size_sum, s.latency_max, s.last_replication_time) == (30, 1.5, clock.t)


def test_maximum_rpo_over_the_window_and_reset():
    s, clock = stats()
    s.record_success(1, 1, cut_time=clock.t)
    clock.t += 1000                                     # a long gap
    s.record_success(1, 1, cut_time=clock.t)
    clock.t += 300
    s.record_success(1, 1, cut_time=clock.t)
    assert s.max_rpo() == 1000 and s.achieved_rpo() == 0
    clock.t += 10
    s.reset()
    assert s.successful == 0 and s.max_rpo() == 0 and s.last_replication_time is not None
    assert s.totals["success"] == 3                      # lifetime counters survive a reset
    clock.t += 200
    assert s.max_rpo() == 200 and s.achieved_rpo() == 210


def test_normal_when_all_is_well():
    s, clock = stats()
    s.record_success(1, 1)
    assert s.health().level is Health.Normal and s.health().reasons == []


@pytest.mark.parametrize("missed,total,level", [(20, 100, Health.Normal), (21, 100, Health.Warning),
                                                (1, 5, Health.Normal), (2, 9, Health.Warning)])
def test_missed_cycles_warning_boundary(missed, total, level):
    s, clock = stats()
    for _ in range(total - missed):
        s.record_success(1, 1)
    s.record_missed(missed)
    report = s.health()
    assert report.level is level
    if level is Health.Warning:
        assert f"{missed} of {total} cycles missed" in report.reasons[0]


@pytest.mark.parametrize("minutes,level", [(59, Health.Normal), (60, Health.Normal), (61, Health.Warning)])
def test_nothing_replicated_for_an_hour(minutes, level):
    s, clock = stats()
    s.record_success(1, 1)
    clock.t += minutes * 60
    assert s.health().level is level


def test_the_rpo_threshold_sets_when_a_stale_machine_warns():
    clock = Clock()
    s = MachineStats("vm1", 30, clock=clock, stale_after=45)
    s.record_success(1, 1)
    clock.t += 44
    assert s.health().level is Health.Normal
    clock.t += 2
    report = s.health()
    assert report.level is Health.Warning
    assert report.reasons == ["nothing replicated for 46 seconds (over the RPO threshold of 45 seconds)"]


def test_never_replicated_counts_from_monitoring_start():
    s, clock = stats()
    clock.t += 59 * 60
    assert s.health().level is Health.Normal
    clock.t += 2 * 60
    assert "no successful replication for 61 minutes" in s.health().reasons[0]


def test_error_in_last_cycle_is_critical_until_a_success():
    s, clock = stats()
    s.record_success(1, 1)
    s.record_failure(OSError("disk full"))
    r = s.health()
    assert r.level is Health.Critical and r.reasons == ["the last cycle failed: disk full"]
    s.record_success(1, 1)
    assert s.health().level is Health.Normal and s.errors == 1


def test_resync_required_is_critical_and_reasons_accumulate():
    s, clock = stats()
    s.resync_required = True
    clock.t += 2 * 3600
    r = s.health()
    assert r.level is Health.Critical
    assert r.reasons[0] == "resynchronization required" and "over the RPO threshold of 60 minutes" in r.reasons[1]
    assert r.to_dict()["health"] == "Critical"


SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>[^}]*)\} (?P<value>\S+)$')
LABEL = re.compile(r'^[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*"$')


def parse_exposition(text: str) -> dict:
    """A strict reader of the text format: HELP then TYPE before a metric's samples, valid names and labels."""
    assert text.endswith("\n")
    types, samples, current = {}, [], None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            current = line.split(" ", 3)[2]
            assert current not in types, f"{current} described twice"
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current and kind in ("counter", "gauge")
            types[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"bad sample line {line!r}"
            assert m["name"] == current, f"{m['name']} outside its block"
            labels = {}
            for part in re.findall(r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"', m["labels"]):
                assert LABEL.match(part)
                k, v = part.split("=", 1)
                labels[k] = v[1:-1]
            assert "machine" in labels
            float(m["value"])
            samples.append((m["name"], labels, float(m["value"])))
    return {"types": types, "samples": samples}


def test_prometheus_exposition_parses():
    a, clock = stats()
    b = MachineStats('odd "name"\\x', 30, clock=clock)
    a.record_success(1000, 2.5, cut_time=clock.t - 3)
    a.record_missed()
    b.record_failure(RuntimeError("boom"))
    text = render_prometheus({"a": a, "b": b}, states={"vm1": "Replicating"})
    parsed = parse_exposition(text)
    assert all(name.startswith("replicator_") for name in parsed["types"])
    assert parsed["types"]["replicator_cycles_total"] == "counter"
    values = {(n, l["machine"], l.get("result")): v for n, l, v in parsed["samples"]}
    assert values[("replicator_cycles_total", "vm1", "missed")] == 1
    assert values[("replicator_replication_size_maximum_bytes", "vm1", None)] == 1000
    assert values[("replicator_rpo_seconds", "vm1", None)] == 3
    assert values[("replicator_health", 'odd \\"name\\"\\\\x', None)] == 2
    assert ("replicator_rpo_seconds", 'odd \\"name\\"\\\\x', None) not in values   # never replicated: no sample
    assert 'replicator_machine_state{machine="vm1",state="Replicating"} 1' in text.splitlines()


def test_statistics_survive_a_snapshot_and_restore():
    clock = [1000.0]
    a = MachineStats("vm", 30, clock=lambda: clock[0])
    a.record_success(5000, 2.0)
    clock[0] += 30
    a.record_missed()
    b = MachineStats("vm", 30, clock=lambda: clock[0])
    b.restore(json.loads(json.dumps(a.snapshot())))          # as the state file holds it
    assert b.to_dict(clock[0]) == a.to_dict(clock[0])

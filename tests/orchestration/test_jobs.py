"""Jobs: progress, percent, rate and ETA on a fake clock; log; end states; persisted summaries."""
from __future__ import annotations

import json

import pytest

from replicator.errors import UsageError
from replicator.orchestration.jobs import RATE_WINDOW, JobRegistry, JobState, format_progress

GiB = 1 << 30


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_progress_percent_rate_and_eta(tmp_path):
    clock = Clock()
    reg = JobRegistry(str(tmp_path), clock=clock)
    job = reg.create("initial", "vm1", total=10 * GiB)
    assert job.percent == 0 and job.eta() is None                 # no progress yet: no ETA
    for _ in range(10):
        clock.t += 1
        job.add(100 << 20)                                        # 100 MiB/s
    assert job.percent == pytest.approx(100 * (1000 << 20) / (10 * GiB))
    assert job.rate() == pytest.approx(100 << 20)
    assert job.eta() == pytest.approx((10 * GiB - (1000 << 20)) / (100 << 20))
    line = format_progress(job)
    assert line.startswith("initial vm1 [##") and "9.8%" in line and "100.0 MiB/s" in line and "ETA 1:32" in line


def test_eta_follows_the_recent_rate():
    clock = Clock()
    job = JobRegistry(None, clock=clock).create("resync", "vm1", total=200_000)
    for _ in range(100):                                          # fast start: 1000 B/s
        clock.t += 1
        job.add(1000)
    for _ in range(int(RATE_WINDOW) + 5):                         # then slow: 100 B/s
        clock.t += 1
        job.add(100)
    assert job.rate() == pytest.approx(100)
    assert job.bytes_done == 103_500
    assert job.eta() == pytest.approx((200_000 - 103_500) / 100)     # not the whole-run average (~766 B/s)


def test_unknown_total_and_end_states(tmp_path):
    clock = Clock()
    reg = JobRegistry(str(tmp_path), clock=clock)
    job = reg.create("failover", "vm1")
    clock.t += 2
    job.progress(5000)
    assert job.percent is None and job.eta() is None and job.rate() == 2500
    assert "  ?  %" in format_progress(job)
    job.note("materialized point 12")
    job.succeed()
    assert job.state is JobState.succeeded and job.percent == 100.0 and job.eta() is None
    with pytest.raises(UsageError, match="already succeeded"):
        job.fail("late")
    other = reg.create("resync", "vm2", total=10)
    other.cancel()
    assert other.cancel_requested and other.state is JobState.running
    other.cancelled()
    assert other.state is JobState.cancelled and format_progress(other).endswith("cancelled")
    third = reg.create("initial", "vm3")
    third.fail(OSError("disk full"))
    assert third.error == "disk full" and third.log[-1]["level"] == "error"
    assert [j.id for j in reg.running()] == []
    with pytest.raises(UsageError, match="no job"):
        reg.get("job-99999")


def test_summaries_persist_and_running_jobs_become_interrupted(tmp_path):
    clock = Clock()
    reg = JobRegistry(str(tmp_path), clock=clock)
    done = reg.create("initial", "vm1", total=100)
    done.progress(100)
    done.succeed()
    running = reg.create("resync", "vm2", total=100)
    running.progress(40)
    reg.save()
    with open(tmp_path / "jobs.json") as f:
        saved = json.load(f)
    assert [j["id"] for j in saved["jobs"]] == ["job-00001", "job-00002"]
    again = JobRegistry(str(tmp_path), clock=clock)
    summaries = {s["id"]: s for s in again.summaries()}
    assert summaries["job-00001"]["state"] == "succeeded"
    assert summaries["job-00002"]["state"] == "failed" and "interrupted" in summaries["job-00002"]["error"]
    assert again.create("initial", "vm3").id == "job-00003"


def test_progress_saves_are_throttled(tmp_path):
    clock = Clock()
    reg = JobRegistry(str(tmp_path), clock=clock)
    job = reg.create("initial", "vm1", total=100)
    path = tmp_path / "jobs.json"
    before = path.read_text()
    job.progress(10)
    assert path.read_text() == before                             # less than SAVE_INTERVAL later: not saved
    clock.t += 10
    job.progress(20)
    assert json.loads(path.read_text())["jobs"][0]["bytes_done"] == 20


def test_corrupt_job_file_is_set_aside(tmp_path):
    (tmp_path / "jobs.json").write_text("{broken")
    reg = JobRegistry(str(tmp_path))
    assert reg.summaries() == [] and (tmp_path / "jobs.json.corrupt").exists()

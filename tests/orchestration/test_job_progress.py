"""A job's progress summed over a machine's disks, each reporting one stream after another, with estimates
until a disk reports; and jobs looked up across a restart."""
from __future__ import annotations

import pytest

from replicator.errors import UsageError
from replicator.orchestration.jobs import JobRegistry, PartsProgress


def test_parts_streams_and_estimates():
    job = JobRegistry(None).create("resync", "vm01")
    assert (job.bytes_done, job.bytes_total) == (0, None)
    meter = PartsProgress(job, {"d0": 1000, "d1": 500})        # the total is known from the start
    assert (job.bytes_done, job.bytes_total, job.percent) == (0, 1500, 0.0)
    meter.update("d0", 100, 800)                                # d0's real total replaces its estimate
    assert (job.bytes_done, job.bytes_total) == (100, 1300)
    meter.update("d0", 800, 800)                                # d0's first stream ends
    meter.update("d0", 50, 200)                                 # ... and its next stream begins
    assert (job.bytes_done, job.bytes_total) == (850, 1500)
    meter.update("d0", 200, 200)
    meter.update("d1", 0, 0)                                    # an empty stream: done at once
    meter.update("d1", 30, 60)
    assert (job.bytes_done, job.bytes_total) == (1030, 1060)
    meter.update("d1", 10, 60)                                  # lower than before: a new stream of 60
    assert (job.bytes_done, job.bytes_total) == (1040, 1120)
    meter.update("d1", 60, 60)
    meter.settle()
    assert (job.bytes_done, job.bytes_total) == (1090, 1120)


def test_settle_drops_estimates_no_stream_replaced():
    job = JobRegistry(None).create("initial", "vm01")
    meter = PartsProgress(job)
    meter.estimate({"d0": 4096, "d1": 8192})
    meter.update("d1", 8192, 8192)
    meter.estimate({"d1": 1})                                   # a late guess never overrides a report
    assert (job.bytes_done, job.bytes_total) == (8192, 12288)
    meter.settle()                                              # d0 sent nothing: its guess goes
    job.succeed()
    assert (job.bytes_done, job.bytes_total, job.percent) == (8192, 8192, 100.0)


def test_find_reaches_jobs_from_before_a_restart(tmp_path):
    reg = JobRegistry(str(tmp_path))
    old = reg.create("initial", "vm01", total=10)
    reg.save()
    again = JobRegistry(str(tmp_path))
    new = again.create("resync", "vm01")
    assert again.find(old.id)["state"] == "failed" and again.find(old.id)["error"].startswith("interrupted")
    assert again.find(new.id)["state"] == "running" and again.find(new.id)["log_count"] == 1
    with pytest.raises(UsageError, match="no job 'job-00042'.*job-00001, job-00002"):
        again.find("job-00042")

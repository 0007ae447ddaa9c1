"""Jobs in replicatord as an operator sees them: the initial replication and an on-demand resync as jobs
with progress, `replicator machine ... --wait` and `replicator jobs`, a running job in `replicator status`,
and a job interrupted by kill -9 shown as failed while the machine's state runs it again."""
from __future__ import annotations

import datetime as dt
import os
import signal
import time

import pytest

from replicator.vhdx import VhdxDisk

from .primary_harness import MiB, Daemon


def jobs_of(d: Daemon, kind: str) -> list[dict]:
    return [j for j in d.jobs() if j["kind"] == kind]


def test_initial_replication_and_resync_on_demand_are_jobs(tmp_path):
    d = Daemon(tmp_path)
    try:
        d.start(until="Replicating")
        # Replicating is announced before the cycle's checkpoint is written; the job ends after it.
        d.wait(lambda m: [j["state"] for j in jobs_of(d, "initial")] != ["running"])
        [initial] = jobs_of(d, "initial")
        assert initial["state"] == "succeeded" and initial["subject"] == "vm01" and initial["error"] is None
        assert initial["bytes_done"] == initial["bytes_total"] > 0        # the streams' changed bytes
        assert d.replica_equals_primary()
        d.qemu_io("d0.vhdx", "write -P 0x61 5M 3M")
        d.qemu_io("d1.vhdx", "write -P 0x62 0 64k")
        done = d.run("machine", "vm01", "resync", "--wait")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].startswith("vm01: ") and "resync running" in lines[0]
        job_id = lines[0].split("; ")[1].split()[0]
        assert any(line.startswith(f"{job_id} resync vm01 [") and line.endswith("succeeded") for line in lines)
        assert f"{job_id}: resync vm01 started" in lines
        job = d.job(job_id)
        assert job["state"] == "succeeded" and job["bytes_done"] == job["bytes_total"] > 0
        assert d.machine()["state"] == "Replicating"
        assert d.replica_equals_primary()
        listing = d.cli("jobs").splitlines()
        assert [line.split()[0] for line in listing] == [initial["id"], job_id]
        shown = d.cli("jobs", job_id)
        assert "resync vm01" in shown and "succeeded" in shown.splitlines()[0] and "started" in shown
        missing = d.run("jobs", "job-99999", check=False)
        assert missing.returncode != 0 and "no job 'job-99999'" in missing.stderr
    finally:
        d.stop()


def slow_site(tmp_path) -> Daemon:
    """A machine whose initial replication takes seconds: incompressible data behind a 2 MiB/s limit."""
    d = Daemon(tmp_path, 'bandwidth_limit = "2M"\ncompression = false', disks=(("d0.vhdx", 32),))
    with VhdxDisk.open(str(tmp_path / "d0.vhdx"), read_only=False) as disk:
        disk.write(4 * MiB, os.urandom(10 * MiB))
    return d


def test_running_job_in_status_and_an_interrupted_job_runs_again(tmp_path):
    d = slow_site(tmp_path)
    try:
        st = d.start(until="InitialReplicationInProgress")
        st = d.wait(lambda m: m["jobs"] and m["jobs"][0]["bytes_total"])   # its size is known a moment later
        [job] = st["jobs"]
        assert job["kind"] == "initial" and job["state"] == "running" and job["bytes_total"] > 0
        text = d.cli("status")
        assert "vm01: InitialReplicationInProgress" in text and f"{job['id']} initial vm01 [" in text
        d.stop(signal.SIGKILL)
        d.start()
        jobs = {j["id"]: j for j in d.jobs()}
        assert jobs[job["id"]]["state"] == "failed" and jobs[job["id"]]["error"].startswith("interrupted")
        st = d.wait(lambda m: m["state"] == "Replicating", timeout=60)
        again = [j for j in d.jobs() if j["kind"] == "initial" and j["id"] != job["id"]]
        assert [j["state"] for j in again] == ["succeeded"]
        log = d.job(again[0]["id"])["log"]
        assert any(f"continues {job['id']}, interrupted" in e["text"] for e in log)
        assert d.replica_equals_primary()
    finally:
        d.stop()


def test_follow_a_running_job_until_it_ends(tmp_path):
    d = slow_site(tmp_path)
    try:
        st = d.start()
        st = d.wait(lambda m: m["jobs"] and m["jobs"][0]["bytes_total"])   # its size is known a moment later
        started = time.time()
        follow = d.run("jobs", "--follow")
        assert follow.returncode == 0, follow.stderr
        assert time.time() - started > 1                              # it really waited for the job
        job_id = st["jobs"][0]["id"]
        assert follow.stdout.splitlines()[-1].startswith(f"{job_id} initial vm01 [")
        assert follow.stdout.splitlines()[-1].endswith("succeeded")
        assert d.machine()["state"] == "Replicating" and d.replica_equals_primary()
        assert d.cli("jobs", "--follow").strip() == "no job is running"
    finally:
        d.stop()


@pytest.mark.parametrize("op", ["cycle", "planned-failover"])
def test_operations_answer_with_their_job(tmp_path, op):
    d = Daemon(tmp_path, disks=(("d0.vhdx", 16),))
    try:
        d.start(until="Replicating")
        d.qemu_io("d0.vhdx", "write -P 0x7e 1M 1M")
        out = d.cli("machine", "vm01", op)
        state = "Replicating" if op == "cycle" else "PreparedForFailover"
        assert out.startswith(f"vm01: {state}") and f" {op} succeeded" in out
        assert d.replica_equals_primary()
        if op == "planned-failover":                                  # the primary stopped: refused now
            again = d.run("machine", "vm01", "cycle", check=False)
            assert again.returncode != 0 and "no replication in state PreparedForFailover" in again.stderr
    finally:
        d.stop()


def test_resync_waits_for_its_window_until_an_operator_starts_it(tmp_path):
    opens = dt.datetime.now() + dt.timedelta(hours=2)
    window = f"{opens:%H:%M}-{opens + dt.timedelta(hours=1):%H:%M}"
    d = Daemon(tmp_path, f'resync_window = "{window}"', disks=(("d0.vhdx", 16),))
    try:
        d.start(until="Replicating")
        d.qemu_io("d0.vhdx", "write -P 0x4d 4M 9M")                # past half the disk in one log
        early = d.run("machine", "vm01", "cycle", check=False)       # a cycle does not start a resync
        assert early.returncode == 1 and f"waits for its window {window}" in early.stderr
        st = d.machine()
        assert st["state"] == "WaitingForStartResynchronize" and st["stats"]["health"] == "Critical"
        assert "grew past 50% of the disk" in st["reason"] and f"(starts {opens:%Y-%m-%d %H:%M}:00)" in st["reason"]
        assert st["starts_at"] == dt.datetime.strptime(f"{opens:%Y-%m-%d %H:%M}", "%Y-%m-%d %H:%M").timestamp()
        assert not d.replica_equals_primary()
        done = d.run("machine", "vm01", "resync", "--wait")
        assert done.returncode == 0 and done.stdout.splitlines()[-1].endswith("succeeded")
        assert d.machine()["state"] == "Replicating" and d.replica_equals_primary()
    finally:
        d.stop()

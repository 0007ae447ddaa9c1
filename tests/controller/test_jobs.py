"""The job queue: two controller processes on one database never run one job twice, leases lapse and are
taken over, and a worker that lost its lease cannot finish the job."""
from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
import time

from replicator.controller import jobs
from replicator.controller import models as m

WORKER = textwrap.dedent("""
    import os, sys, time
    from replicator.controller import jobs
    from replicator.controller.db import Store
    url, name, out = sys.argv[1:4]
    store = Store.open(url, migrate=False)
    with open(out + ".ready", "w"):
        pass
    while not os.path.exists(out + ".go"):
        time.sleep(0.01)
    idle = 0
    while idle < 20:
        job = jobs.claim(store, name, kinds=["work"])
        if job is None:
            idle += 1
            time.sleep(0.02)
            continue
        idle = 0
        fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, f"{job.id} {name}\\n".encode())       # the job's effect: one line per run
        os.close(fd)
        time.sleep(0.005)
        assert jobs.finish(store, job.id, name, "succeeded"), "a claimed job could not be finished"
    store.close()
""")


def test_two_controller_processes_never_run_one_job_twice(store, database_url, tmp_path):
    n = 60
    with store.session() as s:
        for i in range(n):
            jobs.enqueue(s, "work", params={"i": i}, created_by="test")
        jobs.enqueue(s, "other-kind", created_by="test")         # not theirs to take
    out = str(tmp_path / "runs")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, database_url, f"ctl-{k}", out], env=env,
                              stderr=subprocess.PIPE, text=True) for k in (1, 2)]
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(out + ".ready") or sum(p.poll() is None for p in procs) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.stderr.read() for p in procs if p.poll() is not None]
            time.sleep(0.05)
        time.sleep(0.5)                        # both have connected; release them together
        open(out + ".go", "w").close()
        for p in procs:
            assert p.wait(timeout=120) == 0, p.stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    runs = [line.split() for line in open(out).read().splitlines()]
    ids = [int(job_id) for job_id, _ in runs]
    assert sorted(ids) == sorted(set(ids)), "a job ran twice"
    assert len(ids) == n
    by_worker = {w for _, w in runs}
    with store.session() as s:
        states = {j.id: (j.state, j.attempts, j.claimed_by) for j in s.query(m.Job)}
    work = {i: st for i, st in states.items() if st[0] != "queued"}
    assert len(work) == n and all(st[0] == "succeeded" and st[1] == 1 for st in work.values())
    assert [st for st in states.values() if st[0] == "queued"] == [("queued", 0, None)], "the other kind waits"
    print(f"{database_url.split(':')[0]}: runs per worker", {w: sum(1 for _, x in runs if x == w) for w in by_worker})


def test_a_lapsed_lease_is_taken_over_and_the_late_worker_cannot_finish(store):
    with store.session() as s:
        job_id = jobs.enqueue(s, "work", created_by="test").id
    first = jobs.claim(store, "ctl-1", lease=dt.timedelta(milliseconds=300))
    assert first.id == job_id and first.state == "running" and first.claimed_by == "ctl-1"
    assert jobs.claim(store, "ctl-2") is None, "a live lease is respected"
    assert jobs.renew(store, job_id, "ctl-1", lease=dt.timedelta(milliseconds=300), progress=40)
    time.sleep(0.5)
    second = jobs.claim(store, "ctl-2")
    assert second.id == job_id and second.claimed_by == "ctl-2" and second.attempts == 2
    assert not jobs.renew(store, job_id, "ctl-1"), "the lease is lost"
    assert not jobs.finish(store, job_id, "ctl-1", "succeeded"), "a late worker cannot finish"
    assert jobs.finish(store, job_id, "ctl-2", "failed", "host unreachable")
    with store.session() as s:
        j = s.get(m.Job, job_id)
        assert (j.state, j.progress, j.message) == ("failed", 40, "host unreachable")
        lines = [x.line for x in j.log]
    assert lines[1:] == ["claimed by ctl-1", "claimed by ctl-2 (the lease of ctl-1 had lapsed)",
                         "failed (ctl-2): host unreachable"]
    assert jobs.claim(store, "ctl-3") is None, "a finished job is never claimed again"


def test_host_jobs_go_to_their_host_and_cancel_requests_stop_claims(store):
    with store.session() as s:
        site = m.Site(name="a")
        s.add(site)
        s.flush()
        h1, h2 = m.Host(hostname="h1", site_id=site.id), m.Host(hostname="h2", site_id=site.id)
        s.add_all([h1, h2])
        s.flush()
        for_h1 = jobs.enqueue(s, "failover", host_id=h1.id).id
        cancelled = jobs.enqueue(s, "failover", host_id=h1.id)
        jobs.cancel(s, cancelled, "test")
        ids = h1.id, h2.id
    assert jobs.claim(store, "ctl-1") is None, "a controller worker does not take a host's job"
    assert jobs.claim(store, ids[1], host_id=ids[1]) is None
    assert jobs.claim(store, ids[0], host_id=ids[0]).id == for_h1
    assert jobs.claim(store, ids[0], host_id=ids[0]) is None

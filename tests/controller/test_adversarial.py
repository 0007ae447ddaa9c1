"""An adversarial pass over the controller's REST API: values at the edges of what the database can hold,
bodies too large to read, and races between requests (forced on PostgreSQL by holding a row lock while
both requests queue behind it). Each test here failed before its fix; each refusal is one line."""
from __future__ import annotations

import pytest

from .helpers import ok, refused


@pytest.mark.parametrize("since", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"])
def test_audit_since_out_of_range_once_in_utc_is_one_line(controller, since):
    # a valid ISO 8601 date-time whose UTC instant is past year 9999 or before year 1 was a 500
    refused(controller.client.get("/v1/audit", params={"since": since}), 422, "out of range")
    assert ok(controller.client.get("/v1/audit", params={"since": "2000-01-01T00:00:00-05:00"})) is not None


def test_a_body_over_the_limit_is_refused_before_it_is_read(controller):
    from replicator.controller.app import MAX_BODY
    c = controller.client
    big = {"token": "x", "hostname": "h", "csr": "A" * MAX_BODY, "admin_url": "http://127.0.0.1:1",
           "data_url": "https://h:1"}
    # the registration route answers anyone: before, it read and parsed any size (a 422 after the fact)
    refused(c.post("/v1/register", json=big), 413, "request body over")

    def chunks():                         # no Content-Length: counted as it comes
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"A" * 65536
    refused(c.post("/v1/sites", content=chunks(), headers={"content-type": "application/json"}), 413)
    refused(c.post("/v1/sites", content=b"{}", headers={"content-length": "x"}), 413)
    assert ok(c.post("/v1/sites", json={"name": "east", "description": "d" * 1000}), 201)["name"] == "east"
    entry = ok(c.get("/v1/audit", params={"limit": 2}))[1]
    assert entry["action"].startswith("POST") and entry["outcome"].startswith("413"), entry


def test_a_cancel_does_not_overwrite_a_claim_made_after_it_read_the_job(store):
    """Cancel read a queued job, a worker claimed it meanwhile: the cancel was written over the claim (the
    worker ran a job shown as cancelled). Now the cancel becomes a request to that worker."""
    if store.dialect == "sqlite":
        pytest.skip("SQLite runs one transaction at a time (BEGIN IMMEDIATE): this interleaving cannot happen")
    from replicator.controller import jobs
    from replicator.controller import models as m
    with store.session() as s:
        job_id = jobs.enqueue(s, "plan-run", created_by="tests").id
        done_id = jobs.enqueue(s, "plan-run", created_by="tests").id
    with store.session() as s:
        job = s.get(m.Job, job_id)
        assert job.state == "queued"
        claimed = jobs.claim(store, "worker-1")               # another transaction, committed
        assert claimed is not None and claimed.id == job_id
        assert jobs.cancel(s, job, "operator") == "cancel requested"
    with store.session() as s:
        job = s.get(m.Job, job_id)
        assert (job.state, job.claimed_by, job.cancel_requested) == ("running", "worker-1", True)
    assert jobs.finish(store, job_id, "worker-1", "cancelled", "stopped on request")
    with store.session() as s:
        done = s.get(m.Job, done_id)
        assert jobs.claim(store, "worker-2").id == done_id and jobs.finish(store, done_id, "worker-2", "succeeded")
        with pytest.raises(ValueError, match="already succeeded"):
            jobs.cancel(s, done, "operator")
    with store.session() as s:
        assert s.get(m.Job, done_id).state == "succeeded"

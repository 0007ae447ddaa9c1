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

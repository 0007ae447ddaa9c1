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

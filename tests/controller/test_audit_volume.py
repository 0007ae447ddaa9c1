"""What the audit log keeps: a host's routine traffic (a report every poll, a renewal) succeeds without a row
each time, while its refused requests and every operator's change are still recorded."""
from __future__ import annotations

from .helpers import ok, refused
from .test_adversarial import _as_host, _registered


def test_routine_host_traffic_is_not_audited_but_its_refusals_are(controller, tmp_path):
    issued, _ = _registered(controller, tmp_path)
    host = _as_host(controller, issued["certificate"])
    for _ in range(5):
        ok(host.post("/v1/hosts/self/report", json={"revision": 1, "status": {}}))
    refused(host.post("/v1/hosts/self/report", json={"revision": "x", "status": {}}), 422)
    entries = ok(controller.client.get("/v1/audit", params={"limit": 1000}))
    reports = [e for e in entries if e["action"] == "POST /v1/hosts/self/report"]
    assert [e["outcome"][:3] for e in reports] == ["422"], [e["action"] for e in entries]

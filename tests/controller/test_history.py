"""A machine's history (issue 15) on SQLite and PostgreSQL: RPO samples written by its primary host's reports
(one a minute at most, pruned after a week), recovery points from its replica host's reports, its audit
entries; read-only tokens read them all; bad input is a one-line 4xx."""
from __future__ import annotations

import datetime as dt

from fastapi.testclient import TestClient
from sqlalchemy import select

from replicator.controller import history as hi
from replicator.daemon.enrol import HostFiles

from .helpers import deployment, ok, refused


def _as_host(controller, tmp_path, host_id: str, hostname: str) -> TestClient:
    """The app as the TLS layer hands it a request with this host's certificate (CN = its id, tls.py)."""
    issued = controller.app.state.ca.sign(HostFiles(str(tmp_path / hostname)).csr(hostname), host_id, [hostname])

    async def with_cert(scope, receive, send):
        if scope["type"] == "http":
            scope.setdefault("extensions", {})["tls"] = {"client_cert_chain": [issued.pem]}
        await controller.app(scope, receive, send)
    return TestClient(with_cert)


def _fleet(controller, tmp_path):
    hosts = deployment(controller)
    ok(controller.client.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1",
                                                    "disks": ["/var/lib/vm01.vhdx"]}), 201)
    assert controller.client.get("/v1/machines/vm01").json()["replica_host"] == "rb1"
    return {n: _as_host(controller, tmp_path, hosts[n], n) for n in ("pa1", "rb1")}


def _primary_report(rpo: float, pending: int, sent: int, seconds: float | None = 3.5, state: str = "Replicating",
                    health: str = "Normal") -> dict:
    last = {"time": 1_700_000_000.0, "kinds": ["delta"], "bytes_sent": sent}
    if seconds is not None:
        last["seconds"] = seconds
    return {"revision": 1, "status": {"machines": [
        {"name": "vm01", "role": "primary", "state": state,
         "stats": {"health": health, "achieved_rpo": rpo, "pending_size": pending,
                   "last_replication_time": 1_700_000_000.0},
         "last_cycle": last}]}}


def _age_samples(store, by: dt.timedelta) -> None:
    with store.session() as s:
        for row in s.scalars(select(hi.RpoSample)):
            row.at = row.at - by


def test_primary_reports_become_rpo_samples_bounded_and_pruned(controller, tmp_path):
    hosts = _fleet(controller, tmp_path)
    c = controller.client
    assert ok(c.get("/v1/machines/vm01/history"))["samples"] == []
    ok(hosts["pa1"].post("/v1/hosts/self/report", json=_primary_report(42.0, 1 << 20, 5 << 20)))
    doc = ok(c.get("/v1/machines/vm01/history"))
    assert doc["every_seconds"] == 60 and doc["retention_seconds"] == 7 * 86400
    [sample] = doc["samples"]
    assert sample["rpo_seconds"] == 42.0 and sample["pending_bytes"] == 1 << 20
    assert sample["cycle_bytes"] == 5 << 20 and sample["cycle_seconds"] == 3.5
    assert sample["health"] == "Normal" and sample["state"] == "Replicating"
    assert dt.datetime.fromisoformat(sample["last_success_at"]).timestamp() == 1_700_000_000.0
    # a report within the minute changes the machine, not the history
    ok(hosts["pa1"].post("/v1/hosts/self/report", json=_primary_report(50.0, 0, 0, None)))
    assert [x["rpo_seconds"] for x in ok(c.get("/v1/machines/vm01/history"))["samples"]] == [42.0]
    assert ok(c.get("/v1/machines/vm01"))["rpo_seconds"] == 50.0
    # a change of state or health is sampled sooner than the minute, but not within CHANGE_GAP
    failing = _primary_report(55.0, 0, 0, None, state="Error", health="Critical")
    ok(hosts["pa1"].post("/v1/hosts/self/report", json=failing))
    assert [x["rpo_seconds"] for x in ok(c.get("/v1/machines/vm01/history"))["samples"]] == [42.0]
    _age_samples(controller.store, hi.CHANGE_GAP)
    ok(hosts["pa1"].post("/v1/hosts/self/report", json=failing))
    assert [(x["rpo_seconds"], x["health"]) for x in ok(c.get("/v1/machines/vm01/history"))["samples"]] == \
        [(42.0, "Normal"), (55.0, "Critical")]
    # a minute later, the next sample (no cycle duration reported: null)
    _age_samples(controller.store, hi.SAMPLE_EVERY)
    ok(hosts["pa1"].post("/v1/hosts/self/report", json=_primary_report(61.0, 0, 7, None)))
    samples = ok(c.get("/v1/machines/vm01/history"))["samples"]
    assert [x["rpo_seconds"] for x in samples] == [42.0, 55.0, 61.0] and samples[-1]["cycle_seconds"] is None
    # since/until select; both forms of time are taken
    cut = dt.datetime.fromisoformat(samples[-1]["at"])
    assert [x["rpo_seconds"] for x in ok(c.get("/v1/machines/vm01/history",
                                              params={"since": cut.isoformat()}))["samples"]] == [61.0]
    assert [x["rpo_seconds"] for x in ok(c.get("/v1/machines/vm01/history",
                                              params={"until": str(cut.timestamp() - 1)}))["samples"]] == [42.0, 55.0]
    # a week on, the next sample prunes what is older than the retention window
    _age_samples(controller.store, hi.RETENTION - dt.timedelta(seconds=30))
    ok(hosts["pa1"].post("/v1/hosts/self/report", json=_primary_report(5.0, 0, 0)))
    with controller.store.session() as s:
        assert [r.rpo_seconds for r in s.scalars(select(hi.RpoSample).order_by(hi.RpoSample.at))] == [61.0, 5.0]
    # the replica host reporting the machine in its status adds no sample (only its primary's does)
    ok(hosts["rb1"].post("/v1/hosts/self/report", json={**_primary_report(999.0, 0, 0), "revision": 1}))
    _age_samples(controller.store, hi.SAMPLE_EVERY)
    ok(hosts["rb1"].post("/v1/hosts/self/report", json={**_primary_report(999.0, 0, 0), "revision": 1}))
    assert 999.0 not in [x["rpo_seconds"] for x in ok(c.get("/v1/machines/vm01/history"))["samples"]]


def test_history_is_read_only_and_refuses_bad_times_in_one_line(controller, tmp_path):
    _fleet(controller, tmp_path)
    viewer = {"Authorization": f"Bearer {controller.make_token('read-only')}"}
    c = controller.client
    assert ok(c.get("/v1/machines/vm01/history", headers=viewer))["machine"] == "vm01"
    assert ok(c.get("/v1/machines/vm01/points", headers=viewer))["points"] == []
    assert ok(c.get("/v1/machines/vm01/audit", headers=viewer))
    refused(c.get("/v1/machines/vm01/history", headers={"Authorization": "Bearer nope"}), 401)
    for params, words in (({"since": "yesterday"}, "since: must be an ISO 8601"),
                          ({"until": "2026-13-01"}, "until: must be an ISO 8601"),
                          ({"since": "1e300"}, "since: '1e300' is out of range"),
                          ({"since": "nan"}, "since: must be"),
                          ({"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "is after until"),
                          ({"sinse": "2026-01-01"}, "unknown query parameter")):
        refused(c.get("/v1/machines/vm01/history", params=params), 422, words)
    refused(c.get("/v1/machines/nobody/history"), 404, "no machine 'nobody'")
    refused(c.get("/v1/machines/nobody/points"), 404, "no machine 'nobody'")
    schema = c.get("/openapi.json").json()
    for path in ("/v1/machines/{name}/history", "/v1/machines/{name}/points", "/v1/machines/{name}/audit"):
        assert "200" in schema["paths"][path]["get"]["responses"], path
    assert "samples" in schema["components"]["schemas"]["HistoryOut"]["properties"]


def _point(n: int, t: float, consistency: str = "crash") -> dict:
    return {"point": n, "time": t, "consistency": consistency, "generations": {"d" * 32: n + 10}}


def test_replica_reports_its_points_and_extended_legs(controller, tmp_path):
    hosts = _fleet(controller, tmp_path)
    c = controller.client
    legs = [{"name": "vm01", "state": "Replicating", "target": "https://far:8084"}]
    body = {"revision": 1, "status": {"machines": []}, "extended": legs,
            "points": {"vm01": [_point(1, 1_700_000_000.0), _point(2, 1_700_000_300.0, "application")],
                       "unknown": [_point(9, 1_700_000_000.0)]}}
    ok(hosts["rb1"].post("/v1/hosts/self/report", json=body))
    doc = ok(c.get("/v1/machines/vm01/points"))
    assert doc["host"] == "rb1" and doc["reported_at"]
    assert [(p["point"], p["consistency"], p["generations"]) for p in doc["points"]] == \
        [(1, "crash", {"d" * 32: 11}), (2, "application", {"d" * 32: 12})]
    assert dt.datetime.fromisoformat(doc["points"][1]["time"]).timestamp() == 1_700_000_300.0
    assert ok(c.get("/v1/hosts/rb1/report"))["extended"] == legs
    # the primary host does not speak for the replica's points
    ok(hosts["pa1"].post("/v1/hosts/self/report", json={"revision": 1, "status": {}, "points": {"vm01": []}}))
    assert len(ok(c.get("/v1/machines/vm01/points"))["points"]) == 2
    # an agent that does not report points leaves them; a report without the machine empties them
    ok(hosts["rb1"].post("/v1/hosts/self/report", json={"revision": 1, "status": {}}))
    assert len(ok(c.get("/v1/machines/vm01/points"))["points"]) == 2
    ok(hosts["rb1"].post("/v1/hosts/self/report", json={"revision": 1, "status": {}, "points": {}}))
    assert ok(c.get("/v1/machines/vm01/points"))["points"] == []
    # a storage-qualified name (the replica holds machines in two stores) is the machine when it is the only one
    ok(hosts["rb1"].post("/v1/hosts/self/report", json={"revision": 1, "status": {},
                                                       "points": {"vm01@/srv/a": [_point(3, 1_700_000_600.0)]}}))
    assert [p["point"] for p in ok(c.get("/v1/machines/vm01/points"))["points"]] == [3]
    # bad points are refused in one line and change nothing
    for bad, words in (([{**_point(4, 1.0), "consistency": "fuzzy"}], "consistency"),
                       ([{**_point(4, 1.0), "time": -5}], "time"),
                       ([_point(i, 1.0 + i) for i in range(hi.MAX_POINTS + 1)], "points")):
        refused(hosts["rb1"].post("/v1/hosts/self/report", json={"revision": 1, "status": {},
                                                                 "points": {"vm01": bad}}), 422, words)
    assert [p["point"] for p in ok(c.get("/v1/machines/vm01/points"))["points"]] == [3]
    # removing the machine removes its history
    ok(c.post("/v1/machines/vm01/disable"), 202)
    ok(c.delete("/v1/machines/vm01"), 204)
    with controller.store.session() as s:
        assert s.scalars(select(hi.MachinePoints)).all() == []


def test_machine_audit_lists_only_its_entries_newest_first(controller, tmp_path):
    _fleet(controller, tmp_path)
    c = controller.client
    ok(c.post("/v1/machines", json={"name": "vm02", "cloud": "gold", "primary_host": "pa1",
                                          "disks": ["/var/lib/vm02.vhdx"]}), 201)
    ok(c.post("/v1/machines/vm01/pause"), 202)
    ok(c.post("/v1/machines/vm02/pause"), 202)
    ok(c.post("/v1/machines/vm01/resume"), 202)
    entries = ok(c.get("/v1/machines/vm01/audit"))
    assert {e["target"] for e in entries} == {"machine/vm01"}
    assert [e["id"] for e in entries] == sorted((e["id"] for e in entries), reverse=True)
    assert len(entries) == 3                            # created, paused, resumed
    assert len(ok(c.get("/v1/machines/vm01/audit", params={"limit": 1}))) == 1
    refused(c.get("/v1/machines/vm01/audit", params={"limit": 0}), 422)

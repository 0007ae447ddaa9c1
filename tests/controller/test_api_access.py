"""Tokens and roles, the audit log, the admin token file, error shape and /metrics."""
from __future__ import annotations

import datetime as dt
import os
import stat

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from replicator.controller import models as m
from replicator.controller.auth import ensure_admin_token

from .helpers import deployment, ok, refused


def as_(controller, token: str) -> TestClient:
    return TestClient(controller.app, headers={"Authorization": f"Bearer {token}"})


def test_roles(controller):
    deployment(controller)
    ok(controller.client.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1",
                                                    "domain": "vm01"}), 201)
    reader = as_(controller, controller.make_token("read-only", "watcher"))
    op = as_(controller, controller.make_token("operator", "oncall"))
    for path in ("/v1/sites", "/v1/clouds", "/v1/pairs", "/v1/policies", "/v1/machines", "/v1/jobs",
                 "/v1/plans", "/v1/hosts", "/v1/audit", "/metrics"):
        assert reader.get(path).status_code == 200, path
    refused(reader.get("/v1/tokens"), 403, "token 'watcher' is read-only; this needs admin")
    refused(reader.post("/v1/machines/vm01/pause"), 403, "this needs operator")
    refused(reader.post("/v1/sites", json={"name": "c"}), 403)
    refused(reader.post("/v1/plans/x/runs", json={"kind": "test"}), 403)
    assert ok(controller.client.get("/v1/machines/vm01"))["desired_state"] == "enabled", "nothing changed"
    ok(op.post("/v1/machines/vm01/pause"), 202)
    ok(op.post("/v1/machines/vm01/resume"), 202)
    refused(op.post("/v1/sites", json={"name": "c"}), 403, "token 'oncall' is operator; this needs admin")
    refused(op.put("/v1/policies/p5", json={"name": "p5"}), 403)
    refused(op.post("/v1/tokens", json={"name": "mine", "role": "admin"}), 403)
    anonymous = TestClient(controller.app)
    refused(anonymous.get("/v1/sites"), 401, "missing API token")
    refused(as_(controller, "rpc_forged").get("/v1/sites"), 401, "unknown or revoked")
    r = anonymous.get("/v1/sites")
    assert r.headers["www-authenticate"] == "Bearer"


def test_tokens_are_made_shown_once_and_revoked(controller):
    c = controller.client
    made = ok(c.post("/v1/tokens", json={"name": "ci", "role": "operator"}), 201)
    assert made["token"].startswith("rpc_") and made["role"] == "operator"
    refused(c.post("/v1/tokens", json={"name": "ci", "role": "admin"}), 409, "already exists")
    refused(c.post("/v1/tokens", json={"name": "x", "role": "root"}), 422, "role")
    listed = {t["name"]: t for t in ok(c.get("/v1/tokens"))}
    assert set(listed) == {"admin", "ci"} and "token" not in listed["ci"]
    with controller.store.session() as s:
        stored = s.query(m.ApiToken).filter_by(name="ci").one().token_hash
    assert made["token"] not in stored and len(stored) == 64
    ci = as_(controller, made["token"])
    assert ci.get("/v1/sites").status_code == 200
    assert c.delete("/v1/tokens/ci").status_code == 204
    refused(ci.get("/v1/sites"), 401, "revoked")
    refused(c.delete("/v1/tokens/admin"), 409, "cannot revoke itself")
    refused(c.delete("/v1/tokens/ghost"), 404)


def test_audit_log_records_who_what_target_and_outcome(controller, caplog):
    c = controller.client
    ok(c.post("/v1/sites", json={"name": "a"}), 201)
    refused(c.post("/v1/sites", json={"name": "a"}), 409)
    reader_token = controller.make_token("read-only", "watcher")
    refused(as_(controller, reader_token).delete("/v1/sites/a"), 403)
    refused(TestClient(controller.app).post("/v1/sites", json={"name": "b"}), 401)
    as_(controller, reader_token).get("/v1/sites")              # reads are not audited
    entries = ok(c.get("/v1/audit", params={"limit": 10}))
    got = [(e["actor"], e["action"], e["target"], e["outcome"]) for e in entries]
    # a request with no valid credentials is a log line: anyone could otherwise grow the table at will
    assert any("refused without valid credentials: POST /v1/sites" in r.getMessage() for r in caplog.records)
    assert got[:3] == [
        ("watcher", "DELETE /v1/sites/{name}", "/v1/sites/a", "403 token 'watcher' is read-only; this needs admin"),
        ("admin", "POST /v1/sites", "site/a", "409 site 'a' already exists"),
        ("admin", "POST /v1/sites", "site/a", "201 ok")]
    assert all(dt.datetime.fromisoformat(e["at"]).tzinfo for e in entries)
    assert [e["actor"] for e in ok(c.get("/v1/audit", params={"actor": "watcher"}))] == ["watcher"]
    future = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).isoformat()
    assert ok(c.get("/v1/audit", params={"since": future})) == []


def test_audit_log_filtered_by_target(controller):
    """?target= keeps the entries on exactly that target (with actor and since as well); a bad one is a 422."""
    c = controller.client
    for name in ("a", "ab"):
        ok(c.post("/v1/sites", json={"name": name}), 201)
    refused(c.post("/v1/sites", json={"name": "a"}), 409)
    got = ok(c.get("/v1/audit", params={"target": "site/a"}))
    assert [(e["target"], e["outcome"]) for e in got] == [("site/a", "409 site 'a' already exists"),
                                                          ("site/a", "201 ok")]
    assert [e["target"] for e in ok(c.get("/v1/audit", params={"target": "site/ab", "limit": 5}))] == ["site/ab"]
    assert ok(c.get("/v1/audit", params={"target": "site/a", "actor": "someone-else"})) == []
    assert ok(c.get("/v1/audit", params={"target": "site/"})) == []          # exact, not a prefix
    assert len(ok(c.get("/v1/audit", params={"target": "site/a", "limit": 1}))) == 1
    refused(c.get("/v1/audit", params={"target": "x" * 256}), 422)
    doc = ok(c.get("/openapi.json"))
    params = {p["name"] for p in doc["paths"]["/v1/audit"]["get"]["parameters"]}
    assert {"actor", "target", "since", "limit"} <= params


def test_admin_token_file(store, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    token = ensure_admin_token(store, str(data))
    path = data / "admin.token"
    assert path.read_text().strip() == token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ensure_admin_token(store, str(data)) == token, "a restart reuses it"
    path.unlink()
    assert ensure_admin_token(store, str(data)) is None, "no admin token is minted behind the operators' backs"
    assert not path.exists()


def test_errors_are_one_line_json(controller):
    c = controller.client
    refused(c.get("/v1/no/such/thing"), 404, "no such route GET /v1/no/such/thing")
    refused(c.patch("/v1/sites"), 405, "method not allowed")
    refused(c.post("/v1/sites", content=b"{not json", headers={"content-type": "application/json"}), 422)
    refused(c.post("/v1/sites", json=[1, 2]), 422)
    refused(c.post("/v1/sites", json={"name": "a", "description": "x" * 5000}), 422, "description")
    refused(c.post("/v1/sites", content=b'{"name": "a", "description": "\\ud800"}',
                   headers={"content-type": "application/json"}), 422, "description")
    refused(c.get("/v1/jobs/0"), 422, "job_id")
    refused(c.get("/v1/jobs/abc"), 422, "job_id")


def test_metrics(controller):
    c = controller.client
    deployment(controller)
    ok(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1", "domain": "a"}), 201)
    ok(c.post("/v1/machines", json={"name": "vm02", "cloud": "gold", "primary_host": "pa2", "domain": "b"}), 201)
    when = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)
    with controller.store.session() as s:
        x = s.query(m.Machine).filter_by(name="vm01").one()
        x.health, x.rpo_seconds, x.last_success_at = "Normal", 42.5, when
    ok(c.post("/v1/machines/vm02/pause"), 202)
    refused(TestClient(controller.app).get("/metrics"), 401)
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(r.text) for s in family.samples}
    assert samples[("replicator_machines", (("health", "Normal"), ("state", "enabled")))] == 1
    assert samples[("replicator_machines", (("health", "unknown"), ("state", "paused")))] == 1
    vm01 = (("cloud", "gold"), ("machine", "vm01"))
    assert samples[("replicator_machine_rpo_seconds", vm01)] == 42.5
    assert samples[("replicator_machine_last_success_timestamp_seconds", vm01)] == when.timestamp()
    assert ("replicator_machine_rpo_seconds", (("cloud", "gold"), ("machine", "vm02"))) not in samples
    assert samples[("replicator_jobs", (("state", "queued"),))] == 3
    assert samples[("replicator_jobs", (("state", "failed"),))] == 0


def test_an_unreachable_database_is_a_503_not_a_500():
    from replicator.controller.app import create_app
    from replicator.controller.db import Store, make_engine
    from .conftest import free_port
    gone = Store(make_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"))   # nothing listens there
    client = TestClient(create_app(gone), headers={"Authorization": "Bearer rpc_whatever"})
    refused(client.get("/v1/sites"), 503, "the controller's database is unavailable")
    gone.close()

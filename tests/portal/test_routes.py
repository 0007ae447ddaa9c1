"""The console's server side without a browser: the static files stay inside their folder, whoami, the event
stream's authentication and what it sends (the Watcher on SQLite and on a real PostgreSQL)."""
from __future__ import annotations

import json

import httpx
import pytest

from replicator.controller import jobs
from replicator.controller import models as m
from replicator.controller.portal.live import Watcher
from tests.controller.conftest import database_url, pg_server, store  # noqa: F401 (fixtures)


def test_static_files_and_whoami(portal):
    r = httpx.get(portal.url + "/ui", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    r = httpx.get(portal.url + "/ui/")
    assert r.status_code == 200 and "<main id=\"main\">" in r.text
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert httpx.get(portal.url + "/ui/static/vendor/chart.umd.min.js").status_code == 200
    for bad in ("/ui/static/../routes.py", "/ui/static/%2e%2e/routes.py", "/ui/static/%2e%2e/%2e%2e/db.py",
                "/ui/static/nothing.js", "/ui/static/pages"):
        r = httpx.get(portal.url + bad)
        assert r.status_code == 404, bad
        assert list(r.json()) == ["error"], bad
    viewer = portal.make_token("read-only", "viewer")
    assert portal.api("GET", "/v1/whoami", viewer).json() == {"name": "viewer", "role": "read-only"}
    r = httpx.get(portal.url + "/v1/whoami")
    assert r.status_code == 401 and r.json()["error"].startswith("missing API token")


def _events(lines, n: int) -> list[tuple[str, dict]]:
    out, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[6:])))
            if len(out) == n:
                return out
    raise AssertionError(f"the stream ended after {out}")


def test_event_stream_needs_a_token_and_sends_changes(portal):
    r = httpx.get(portal.url + "/v1/events", headers={"Authorization": "Bearer rpc_wrong"})
    assert r.status_code == 401 and r.json() == {"error": "unknown or revoked API token"}
    assert portal.api("POST", "/v1/sites", json={"name": "alpha"}).status_code == 201
    viewer = portal.make_token("read-only", "viewer")
    with httpx.stream("GET", portal.url + "/v1/events", headers={"Authorization": f"Bearer {viewer}"},
                      timeout=10) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = resp.iter_lines()
        assert _events(lines, 1)[0][0] == "ready"
        with portal.store.session() as s:
            job_id = jobs.enqueue(s, "resync", created_by="tests", message="waiting").id
        (name, data), = _events(lines, 1)
        assert name == "job"
        assert data == {**portal.api("GET", f"/v1/jobs/{job_id}").json(), "log": None}


def test_watcher_sends_what_changed(store):  # noqa: F811 (the fixture: SQLite and PostgreSQL)
    w = Watcher()
    with store.session() as s:
        s.add(m.Site(name="alpha"))
    with store.session() as s:
        assert w.poll(s) == [("ready", {"at": w.started.isoformat()})]
    with store.session() as s:
        assert w.poll(s) == []
        a = jobs.enqueue(s, "resync", created_by="t").id
        b = jobs.enqueue(s, "pause-protection", created_by="t").id
    with store.session() as s:
        assert [(e, d["id"], d["state"]) for e, d in w.poll(s)] == [("job", a, "queued"), ("job", b, "queued")]
    taken = jobs.claim(store, "worker", kinds=["resync"])
    assert jobs.renew(store, taken.id, "worker", progress=30)
    with store.session() as s:
        assert [(e, d["id"], d["state"], d["progress"]) for e, d in w.poll(s)] == [("job", a, "running", 30)]
        assert w.poll(s) == []
    assert jobs.finish(store, a, "worker", "succeeded")
    with store.session() as s:
        assert [(d["id"], d["state"], d["progress"]) for _, d in w.poll(s)] == [(a, "succeeded", 100)]
        assert w.poll(s) == []
    assert set(w.jobs) == {a, b}


@pytest.mark.parametrize("token", ["", "Bearer", "Basic abc"])
def test_event_stream_refuses_without_bearer(portal, token):
    r = httpx.get(portal.url + "/v1/events", headers={"Authorization": token} if token else {})
    assert r.status_code == 401 and list(r.json()) == ["error"]


def test_controller_stops_with_a_console_open(tmp_path):
    """An open event stream never ends by itself: SIGTERM must not wait for the browser to go away."""
    import signal
    import ssl
    import time

    from tests.controller.test_host_channel import ControllerProc

    ctl = ControllerProc(tmp_path).start()
    try:
        ctx = ssl.create_default_context(cafile=ctl.ca_path)
        with httpx.stream("GET", ctl.url + "/v1/events", headers={"Authorization": f"Bearer {ctl.token}"},
                          verify=ctx, timeout=30) as resp:
            lines = resp.iter_lines()
            assert _events(lines, 1)[0][0] == "ready"
            started = time.monotonic()
            ctl.proc.send_signal(signal.SIGTERM)
            assert ctl.proc.wait(20) in (0, -signal.SIGTERM)   # uvicorn re-raises SIGTERM after its shutdown
            assert time.monotonic() - started < 15
    finally:
        ctl.stop()


def test_observed_machines(portal):
    from . import fleet
    fleet.build(portal)
    viewer = portal.make_token("read-only")
    rows = {o["machine"]: o for o in portal.api("GET", "/v1/observed/machines", viewer).json()}
    assert sorted(rows) == ["app01", "db01", "web01", "web02"]
    assert rows["web02"]["primary"]["host"] == "hv1"
    assert rows["web02"]["primary"]["entry"]["stats"]["pending_size"] == 12 << 20
    assert rows["db01"]["primary"]["entry"]["state"] == "Error"
    assert rows["app01"]["primary"] is None and rows["web01"]["replica"] is None    # nothing reported
    one = portal.api("GET", "/v1/observed/machines?machine=db01", viewer).json()
    assert [o["machine"] for o in one] == ["db01"]
    r = portal.api("GET", "/v1/observed/machines?machine=nosuch", viewer)
    assert r.status_code == 404 and r.json() == {"error": "no machine 'nosuch'"}
    r = portal.api("GET", "/v1/observed/machines?machine=bad%20name", viewer)
    assert r.status_code == 422 and list(r.json()) == ["error"]
    assert httpx.get(portal.url + "/v1/observed/machines").status_code == 401


def test_event_stream_ends_when_its_token_is_revoked(portal):
    portal.make_token("read-only", "viewer")
    viewer = portal.api("POST", "/v1/tokens", json={"name": "temp", "role": "read-only"}).json()["token"]
    with httpx.stream("GET", portal.url + "/v1/events", headers={"Authorization": f"Bearer {viewer}"},
                      timeout=10) as resp:
        lines = resp.iter_lines()
        assert _events(lines, 1)[0][0] == "ready"
        assert portal.api("DELETE", "/v1/tokens/temp").status_code == 204
        assert _events(lines, 1) == [("revoked", {"error": "this API token was revoked"})]
        assert list(lines) == [""]                       # and the stream ends

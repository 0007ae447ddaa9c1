"""A small fleet for the console's tests, built through the REST API where the API builds it (sites, clouds,
policy, pair, machines); hosts are rows as registration leaves them and machines' observed columns are set
as a host's report sets them (the host channel is H2's and tested with real hosts in tests/controller)."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from replicator.controller import history as hi
from replicator.controller import models as m


def _ok(resp, status=(200, 201, 202, 204)):
    assert resp.status_code in status, f"{resp.request.method} {resp.request.url}: {resp.status_code} {resp.text}"
    return resp.json() if resp.content else None


def add_host(portal, hostname: str, site: str, *, seen_ago: float | None = 5, cert_days: float = 300) -> str:
    now = m.utcnow()
    with portal.store.session() as s:
        site_id = s.query(m.Site.id).filter_by(name=site).scalar()
        h = m.Host(hostname=hostname, site_id=site_id, admin_url=f"https://{hostname}:8443",
                   data_url=f"https://{hostname}:8444",
                   last_seen=None if seen_ago is None else now - dt.timedelta(seconds=seen_ago),
                   cert_not_after=now + dt.timedelta(days=cert_days), desired_revision=1, applied_revision=1)
        s.add(h)
        s.flush()
        return h.id


def observe(portal, machine: str, **values) -> None:
    """What a host's report writes about a machine (observed_state, health, rpo_seconds, last_success_at)."""
    values.setdefault("observed_at", m.utcnow())
    with portal.store.session() as s:
        x = s.query(m.Machine).filter_by(name=machine).one()
        for k, v in values.items():
            setattr(x, k, v)


def report(portal, hostname: str, entries: list[dict]) -> None:
    """A host's report as the host channel stores it (hosts.last_report): its /v1/status machines' entries."""
    with portal.store.session() as s:
        h = s.query(m.Host).filter_by(hostname=hostname).one()
        h.last_report = {"revision": h.applied_revision, "status": {"machines": entries}, "jobs": [],
                         "problems": [], "received_at": m.utcnow().isoformat()}


def entry(name: str, state: str, health: str, reasons: list[str], pending: int, **stats) -> dict:
    """A machine's entry in a primary's status document (daemon/primary.py status(), health.py to_dict())."""
    return {"name": name, "role": "primary", "state": state, "reason": None,
            "stats": {"health": health, "health_reasons": reasons, "pending_size": pending, "successful_cycles": 12,
                      "failed_cycles": 1 if health == "Critical" else 0, "missed_cycles": 0,
                      "average_size": 3 << 20, "maximum_size": 9 << 20, "average_latency": 1.5,
                      "maximum_latency": 4.0, **stats},
            "disks": {f"{name}.vhdx": {"disk_id": "0" * 32, "tracking": "Tracking", "reason": None}},
            "last_cycle": {"time": m.utcnow().timestamp() - 60, "kinds": ["delta"], "bytes_sent": 5 << 20}}


MISSED = "4 of 12 cycles missed (33 % > 20 %)"


def hv1_entries() -> list[dict]:
    return [entry("web01", "Replicating", "Normal", [], 0),
            entry("web02", "Replicating", "Warning", [MISSED], 12 << 20)]


def build(portal) -> dict:
    api = portal.api
    for site in ("alpha", "beta"):
        _ok(api("POST", "/v1/sites", json={"name": site}))
    _ok(api("POST", "/v1/clouds", json={"name": "gold", "site": "alpha"}))
    _ok(api("POST", "/v1/clouds", json={"name": "gold-dr", "site": "beta"}))
    _ok(api("POST", "/v1/policies", json={"name": "five-min", "frequency": "5m"}))
    _ok(api("POST", "/v1/pairs", json={"name": "gold-pair", "primary": "gold", "recovery": "gold-dr",
                                        "policy": "five-min"}))
    hosts = {"hv1": add_host(portal, "hv1", "alpha"), "hv2": add_host(portal, "hv2", "alpha"),
             "dr1": add_host(portal, "dr1", "beta", seen_ago=3600, cert_days=3)}
    _ok(api("PUT", "/v1/hosts/hv1/cloud", json={"cloud": "gold"}))
    _ok(api("PUT", "/v1/hosts/hv2/cloud", json={"cloud": "gold"}))
    _ok(api("PUT", "/v1/hosts/dr1/cloud", json={"cloud": "gold-dr"}))
    now = m.utcnow()
    machines = [("web01", "hv1", "Replicating", "Normal", 40.0), ("web02", "hv1", "Replicating", "Warning", 900.0),
                ("db01", "hv2", "Error", "Critical", 4000.0), ("app01", "hv2", None, None, None)]
    for name, host, state, health, rpo in machines:
        _ok(api("POST", "/v1/machines", json={"name": name, "cloud": "gold", "primary_host": host,
                                              "disks": [f"/var/lib/vms/{name}.vhdx"]}))
        if state:
            observe(portal, name, observed_state=state, health=health, rpo_seconds=rpo,
                    last_success_at=now - dt.timedelta(seconds=rpo))
    refused = "the last cycle failed: https://dr1:8444: connection refused"
    report(portal, "hv1", hv1_entries())
    report(portal, "hv2", [entry("db01", "Error", "Critical", [refused], 40 << 20, last_error=refused[22:])])
    return {"hosts": hosts, "machines": [x[0] for x in machines]}


def as_host(portal, tmp_path, hostname: str):
    """The portal's app as its TLS layer hands it a request from this host (its certificate, CN = its id): a
    host's report goes through the real host channel."""
    from fastapi.testclient import TestClient

    from replicator.daemon.enrol import HostFiles
    with portal.store.session() as s:
        host_id = s.scalar(select(m.Host.id).where(m.Host.hostname == hostname))
    pem = portal.app.state.ca.sign(HostFiles(str(tmp_path / hostname)).csr(hostname), host_id, [hostname]).pem

    async def with_cert(scope, receive, send):
        if scope["type"] == "http":
            scope.setdefault("extensions", {})["tls"] = {"client_cert_chain": [pem]}
        await portal.app(scope, receive, send)
    return TestClient(with_cert)


def host_report(host, body: dict) -> None:
    r = host.post("/v1/hosts/self/report", json={"revision": 1, **body})
    assert r.status_code == 200, r.text


def history(portal, tmp_path, machine: str, rpos, *, primary: str, replica: str, points: int = 3,
            minutes: int = 3, health: str = "Normal", reasons: tuple = ()) -> None:
    """`primary` reports `machine` once per RPO in `rpos`, `minutes` apart (the samples aged in between, each
    report a cycle of its own, i MiB in 2*i s), then `replica` reports `points` recovery points of it, ten
    minutes apart, the second application-consistent."""
    first = as_host(portal, tmp_path, primary)
    t0 = m.utcnow().timestamp() - 60 * minutes * len(rpos)
    for i, rpo in enumerate(rpos):
        if i:
            with portal.store.session() as s:
                for row in s.scalars(select(hi.RpoSample).where(hi.RpoSample.machine_id == select(m.Machine.id)
                                                                .where(m.Machine.name == machine).scalar_subquery())):
                    row.at -= dt.timedelta(minutes=minutes)
        e = entry(machine, "Replicating", health, list(reasons), 1 << 20, achieved_rpo=rpo,
                  last_replication_time=t0 + 60 * minutes * i)
        e["last_cycle"] = {"time": t0 + 60 * minutes * i, "kinds": ["delta"], "bytes_sent": (i + 1) << 20,
                           "seconds": 2.0 * (i + 1)}
        host_report(first, {"status": {"machines": [e]}})
    now = m.utcnow().timestamp()
    host_report(as_host(portal, tmp_path, replica), {"status": {"machines": []}, "points": {machine: [
        {"point": n, "time": now - 600 * (points + 1 - n), "consistency": "application" if n == 2 else "crash",
         "generations": {"a" * 32: 10 + n}} for n in range(1, points + 1)]}})

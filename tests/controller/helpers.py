"""Building a small deployment through the API (and hosts straight in the store: registering them is the host
channel's business, tested in its own files)."""
from __future__ import annotations

from replicator.controller import models as m


def ok(r, status: int = 200):
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return r.json() if r.content else None


def refused(r, status: int, contains: str = ""):
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    body = r.json()
    assert set(body) == {"error"} and "\n" not in body["error"], body
    assert contains in body["error"], body
    return body["error"]


def add_host(store, hostname: str, site: str) -> str:
    with store.session() as s:
        site_id = s.query(m.Site).filter_by(name=site).one().id
        h = m.Host(hostname=hostname, site_id=site_id, admin_url="http://127.0.0.1:8085",
                   data_url=f"https://{hostname}:8084")
        s.add(h)
        s.flush()
        return h.id


def deployment(ctl) -> dict:
    """Sites a (primary) and b (recovery), clouds gold (a) and silver (b) in pair gold-silver with policy p5,
    hosts pa1, pa2 in gold and rb1 in silver."""
    c = ctl.client
    for site in ("a", "b"):
        ok(c.post("/v1/sites", json={"name": site}), 201)
    ok(c.post("/v1/clouds", json={"name": "gold", "site": "a"}), 201)
    ok(c.post("/v1/clouds", json={"name": "silver", "site": "b"}), 201)
    ok(c.post("/v1/policies", json={"name": "p5", "frequency": "5m", "additional_points": 4,
                                    "app_consistent_hours": 1}), 201)
    ok(c.post("/v1/pairs", json={"name": "gold-silver", "primary": "gold", "recovery": "silver",
                                 "policy": "p5"}), 201)
    hosts = {name: add_host(ctl.store, name, site) for name, site in (("pa1", "a"), ("pa2", "a"), ("rb1", "b"))}
    for name, cloud in (("pa1", "gold"), ("pa2", "gold"), ("rb1", "silver")):
        ok(c.put(f"/v1/hosts/{name}/cloud", json={"cloud": cloud}))
    return hosts

"""Reverse replication and failback through the controller, without hosts (the app and the real store, SQLite and
PostgreSQL): which machine states allow them (one-line 409s otherwise), the host steps each job asks in order
as the hosts report them (failover.follow, as the report route calls it), the epoch and owner, the primary
host's [replica] for the way back, and what a failed or cancelled failback leaves."""
from __future__ import annotations

from replicator.controller import desired, failover
from replicator.controller import models as m
from replicator.orchestration.settings import parse_config_data

from .helpers import deployment, ok, refused


def _report(controller, host_id: str, vm: str, job: dict, op: str, state: str, **more) -> None:
    with controller.store.session() as s:
        failover.follow(s, s.get(m.Host, host_id),
                        {vm: {"site": {"job": job["id"], "op": op, "state": state, **more}}})


def _render(controller, host_id: str) -> dict:
    with controller.store.session() as s:
        return desired.render(s, s.get(m.Host, host_id))


def _committed(controller, hosts) -> None:
    """vm01 on pa1, failed over unplanned to rb1 and committed (the hosts' reports played by hand)."""
    c = controller.client
    ok(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1",
                                    "disks": ["/vms/vm01.vhdx"]}), 201)
    refused(c.post("/v1/machines/vm01/reverse"), 409, "needs a committed failover")
    refused(c.post("/v1/machines/vm01/failback"), 409, "needs reverse replication running")
    job = ok(c.post("/v1/machines/vm01/failover", json={"kind": "unplanned"}), 202)
    _report(controller, hosts["rb1"], "vm01", job, "failover", "succeeded", point=3, epoch=2)
    assert ok(c.get("/v1/machines/vm01"))["direction"] == "failed-over"
    refused(c.post("/v1/machines/vm01/reverse"), 409, "commit it first")
    job = ok(c.post("/v1/machines/vm01/commit-failover"), 202)
    _report(controller, hosts["rb1"], "vm01", job, "commit-failover", "succeeded")
    assert ok(c.get("/v1/machines/vm01"))["direction"] == "committed"


def test_reverse_then_failback_move_through_their_host_steps(controller):
    c = controller.client
    hosts = deployment(controller)
    _committed(controller, hosts)
    assert "replica" not in _render(controller, hosts["pa1"])["config"]
    refused(c.post("/v1/machines/vm01/failback"), 409, "needs reverse replication running")
    refused(c.post("/v1/machines/nope/reverse"), 404)

    # reverse: pa1 accepts (forced: the controller gave the machine to rb1), then rb1 replicates back to pa1
    rev = ok(c.post("/v1/machines/vm01/reverse"), 202)
    assert rev["kind"] == "reverse" and rev["host"] == hosts["pa1"], rev
    refused(c.post("/v1/machines/vm01/reverse"), 409, "under way")
    refused(c.post("/v1/machines/vm01/failover", json={"kind": "unplanned"}), 409, "under way")
    doc = _render(controller, hosts["pa1"])
    assert doc["operations"]["vm01"]["site"]["op"] == "accept-reverse"
    assert doc["operations"]["vm01"]["site"]["args"] == {"from": hosts["rb1"], "force": True}
    allow = doc["config"]["replica"]["allow"]        # pa1 listens on its data URL for rb1's cycles
    assert allow == [{"principal": hosts["rb1"], "storage": "../replica", "trust_group": "gold-silver"}], allow
    assert doc["config"]["replica"]["port"] == 8084 and doc["config"]["replica"]["cert"] == "host.pem"
    assert doc["config"]["machine"][0]["name"] == "vm01"      # kept: it is handed over, and failback protects it
    parse_config_data(doc["config"], base_dir="/tmp/state/controller", source="desired")    # replicatord takes it
    _report(controller, hosts["rb1"], "vm01", rev, "accept-reverse", "succeeded")     # not its host: ignored
    assert ok(c.get(f"/v1/jobs/{rev['id']}"))["state"] == "queued"
    _report(controller, hosts["pa1"], "vm01", rev, "accept-reverse", "succeeded")
    job = ok(c.get(f"/v1/jobs/{rev['id']}"))
    assert (job["state"], job["host"], job["params"]["op"]) == ("running", hosts["rb1"], "reverse"), job
    step = _render(controller, hosts["rb1"])["operations"]["vm01"]["site"]
    assert step["args"]["settings"] == {"target": "https://pa1:8084", "frequency": 300, "additional_points": 4,
                                        "compression": True, "bandwidth_limit": "none"}, step
    _report(controller, hosts["rb1"], "vm01", rev, "reverse", "succeeded", epoch=2)
    job = ok(c.get(f"/v1/jobs/{rev['id']}"))
    assert job["state"] == "succeeded" and "replicates back to pa1" in job["message"], job
    vm01 = ok(c.get("/v1/machines/vm01"))
    assert (vm01["direction"], vm01["owner_site"], vm01["fencing_epoch"]) == ("reversed", "b", 2), vm01
    assert _render(controller, hosts["pa1"])["config"]["replica"]["allow"][0]["principal"] == hosts["rb1"]
    assert _render(controller, hosts["rb1"])["fencing"]["vm01"] == {"epoch": 2, "role": "primary"}
    refused(c.post("/v1/machines/vm01/reverse"), 409, "is reversed")
    refused(c.post("/v1/machines/vm01/failover", json={"kind": "planned"}), 409, "reverse replication and fail back")
    refused(c.post("/v1/machines/vm01/commit-failover"), 409, "no failover waiting")

    # failback: epoch 3 and site a from the request; rb1's final cycle, pa1's planned failover, rb1 accepts,
    # pa1 protects the machine forward again
    fb = ok(c.post("/v1/machines/vm01/failback"), 202)
    vm01 = ok(c.get("/v1/machines/vm01"))
    assert (vm01["owner_site"], vm01["fencing_epoch"]) == ("a", 3), vm01
    assert fb["params"]["epoch_from"] == 2 and fb["params"]["epoch_to"] == 3, fb
    expected = [("rb1", "planned-failover", None), ("pa1", "failover", None),
                ("rb1", "accept-reverse", {"from": hosts["pa1"], "force": False}), ("pa1", "reverse", None)]
    for n, (host, op, args) in enumerate(expected):
        job = ok(c.get(f"/v1/jobs/{fb['id']}"))
        assert (job["host"], job["params"]["op"]) == (hosts[host], op), (n, job)
        site = _render(controller, hosts[host])["operations"]["vm01"]["site"]
        assert site["op"] == op and (args is None or site["args"] == args), site
        assert site["planned"] is (op == "failover"), site
        _report(controller, hosts[host], "vm01", fb, op, "succeeded", **({"epoch": 4} if op == "failover" else {}))
    job = ok(c.get(f"/v1/jobs/{fb['id']}"))
    assert job["state"] == "succeeded" and "runs on pa1 again" in job["message"], job
    vm01 = ok(c.get("/v1/machines/vm01"))
    assert (vm01["direction"], vm01["owner_site"], vm01["fencing_epoch"]) == ("forward", "a", 4), vm01
    assert "replica" not in _render(controller, hosts["pa1"])["config"]       # the way back is closed
    assert _render(controller, hosts["pa1"])["fencing"]["vm01"] == {"epoch": 4, "role": "primary"}
    refused(c.post("/v1/machines/vm01/failback"), 409, "is forward")
    # and the machine can fail over again, as any protected machine
    ok(c.post("/v1/machines/vm01/failover", json={"kind": "unplanned"}), 202)
    audit = [a["action"] for a in ok(c.get("/v1/machines/vm01/audit"))]
    assert any("reverse" in a for a in audit) and any("failback" in a for a in audit), audit


def test_a_failback_that_fails_or_is_cancelled_before_a_host_moved_leaves_reverse_replication(controller):
    c = controller.client
    hosts = deployment(controller)
    _committed(controller, hosts)
    rev = ok(c.post("/v1/machines/vm01/reverse"), 202)
    _report(controller, hosts["pa1"], "vm01", rev, "accept-reverse", "failed", error="vm01: no such machine")
    job = ok(c.get(f"/v1/jobs/{rev['id']}"))
    assert job["state"] == "failed" and "nothing changed" in job["message"], job
    assert ok(c.get("/v1/machines/vm01"))["direction"] == "committed"
    assert "replica" not in _render(controller, hosts["pa1"])["config"]
    rev = ok(c.post("/v1/machines/vm01/reverse"), 202)                   # asked again
    _report(controller, hosts["pa1"], "vm01", rev, "accept-reverse", "succeeded")
    _report(controller, hosts["rb1"], "vm01", rev, "reverse", "failed", error="pa1 refused the connection")
    job = ok(c.get(f"/v1/jobs/{rev['id']}"))
    assert job["state"] == "failed" and "ran accept-reverse already" in job["message"], job
    rev = ok(c.post("/v1/machines/vm01/reverse"), 202)
    _report(controller, hosts["pa1"], "vm01", rev, "accept-reverse", "succeeded")
    _report(controller, hosts["rb1"], "vm01", rev, "reverse", "succeeded")
    assert ok(c.get("/v1/machines/vm01"))["direction"] == "reversed"

    fb = ok(c.post("/v1/machines/vm01/failback"), 202)
    _report(controller, hosts["rb1"], "vm01", fb, "planned-failover", "failed", error="the final cycle failed")
    job = ok(c.get(f"/v1/jobs/{fb['id']}"))
    assert job["state"] == "failed" and "stays with rb1" in job["message"], job
    vm01 = ok(c.get("/v1/machines/vm01"))
    assert (vm01["direction"], vm01["owner_site"], vm01["fencing_epoch"]) == ("reversed", "b", 3), vm01
    assert _render(controller, hosts["rb1"])["fencing"]["vm01"] == {"epoch": 3, "role": "primary"}

    fb = ok(c.post("/v1/machines/vm01/failback"), 202)
    assert ok(c.get("/v1/machines/vm01"))["fencing_epoch"] == 4
    ok(c.post(f"/v1/jobs/{fb['id']}/cancel"))
    vm01 = ok(c.get("/v1/machines/vm01"))
    assert (vm01["direction"], vm01["owner_site"], vm01["fencing_epoch"]) == ("reversed", "b", 4), vm01
    assert _render(controller, hosts["pa1"])["config"]["replica"]["allow"][0]["principal"] == hosts["rb1"]


def test_reverse_needs_a_certificate_peer_policy(controller):
    c = controller.client
    hosts = deployment(controller)
    ok(c.post("/v1/policies", json={"name": "krb", "frequency": "5m", "auth": "kerberos"}), 201)
    _committed(controller, hosts)
    ok(c.put("/v1/pairs/gold-silver/policy", json={"policy": "krb"}))
    refused(c.post("/v1/machines/vm01/reverse"), 409, "certificate authentication")

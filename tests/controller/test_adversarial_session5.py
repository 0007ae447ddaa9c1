"""Adversarial review of session 5's controller additions (history, points, extended legs, failback): a registered
host or an authenticated user sending what the code did not expect gets a one-line 4xx, and nothing it stored
breaks a later read for everyone else. SQLite and PostgreSQL."""
from __future__ import annotations

import json

from .helpers import ok, refused
from .test_history import _fleet


def _point(n: int, gens: dict | None = None) -> dict:
    return {"point": n, "time": 1_700_000_000.0 + n, "consistency": "crash", "generations": gens or {"d0": n}}


def test_points_with_a_lone_surrogate_are_refused_and_break_no_read(controller, tmp_path):
    """A replica host's points name machines and disks by strings outside _servable's reach: a lone surrogate
    in either (a valid JSON escape, not Unicode) would be stored and break GET /v1/hosts/HOST/report and
    GET /v1/machines/NAME/points for everyone: pydantic's str refuses it (a regression guard)."""
    hosts = _fleet(controller, tmp_path)
    c = controller.client
    ok(hosts["rb1"].post("/v1/hosts/self/report", json={"revision": 1, "status": {}, "points": {"vm01": [_point(1)]}}))
    for points in ({"vm\ud800": [_point(2)]}, {"vm01": [_point(2, {"d\udc00": 2})]}):
        body = json.dumps({"revision": 1, "status": {}, "points": points})      # ASCII: the escape as sent
        refused(hosts["rb1"].post("/v1/hosts/self/report", content=body, headers={"content-type": "application/json"}),
                422)
    assert [p["point"] for p in ok(c.get("/v1/machines/vm01/points"))["points"]] == [1]
    assert ok(c.get("/v1/hosts/rb1/report"))["points"] == {"vm01": [
        {**_point(1), "time": 1_700_000_001.0}]}


def test_history_range_at_the_edge_of_time_is_a_one_line_422(controller, tmp_path):
    """until at the first representable instant: the default since (until minus the retention) overflowed into a
    500 unless app.py's OverflowError handler answers (a regression guard); the far future works."""
    _fleet(controller, tmp_path)
    c = controller.client
    for until in ("0001-01-01T00:00:00", "0001-01-03T00:00:00+00:00", "-62135596800"):
        refused(c.get("/v1/machines/vm01/history", params={"until": until}), 422, "out of range")
    assert ok(c.get("/v1/machines/vm01/history", params={"since": "0001-01-01T00:00:00",
                                                         "until": "9999-12-31T23:59:59"}))["samples"] == []
    for bad in ("nan", "inf", "-inf", "1e300", "9999-12-31T23:59:59-14:00"):
        refused(c.get("/v1/machines/vm01/history", params={"since": bad}), 422, "since")


def test_a_third_site_host_holding_extended_replicas_is_not_forgotten_silently(controller):
    """DELETE /v1/hosts/HOST refused a host with machines placed on it as primary or replica, but not one
    holding machines' extended replicas: the placements vanished (ON DELETE CASCADE) and the machines were
    placed afresh on another third-site host (a new full copy), while PUT /v1/hosts/HOST/cloud refuses it."""
    from .test_extended import LEG, _third_site
    _third_site(controller)
    c = controller.client
    ok(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1",
                                    "disks": ["/srv/vm01.vhdx"]}), 201)
    assert ok(c.post("/v1/pairs/gold-silver/extended", json=LEG), 201)["machines"] == {"vm01": "tc1"}
    refused(c.delete("/v1/hosts/tc1"), 409, "machine")
    assert ok(c.get("/v1/pairs/gold-silver/extended"))["machines"] == {"vm01": "tc1"}
    ok(c.delete("/v1/hosts/tc2"), 204)                      # one holding none goes


def test_a_failback_cancelled_after_a_host_moved_leaves_the_machine_with_the_site_that_runs_it(controller):
    """Between two failback steps nobody holds the job, so a cancel ends it at once; failover.withdrawn then
    gave the machine back to the recovery site whatever step the hosts had reached -- after the primary host's
    planned failover, the site that runs the machine was fenced as the replica and the stopped recovery site
    handed the primary role (a split-brain risk at the next failback). Only a cancel before any host moved may
    do that (as _stopped_at says for a failed step)."""
    from .test_failback_rules import _committed, _render, _report
    from .helpers import deployment
    c = controller.client
    hosts = deployment(controller)
    _committed(controller, hosts)
    rev = ok(c.post("/v1/machines/vm01/reverse"), 202)
    _report(controller, hosts["pa1"], "vm01", rev, "accept-reverse", "succeeded")
    _report(controller, hosts["rb1"], "vm01", rev, "reverse", "succeeded")
    fb = ok(c.post("/v1/machines/vm01/failback"), 202)
    _report(controller, hosts["rb1"], "vm01", fb, "planned-failover", "succeeded")
    _report(controller, hosts["pa1"], "vm01", fb, "failover", "succeeded")         # pa1 runs vm01 now
    job = ok(c.post(f"/v1/jobs/{fb['id']}/cancel"))
    assert job["state"] == "cancelled", job
    vm01 = ok(c.get("/v1/machines/vm01"))
    assert (vm01["owner_site"], vm01["fencing_epoch"]) == ("a", 3), vm01
    assert _render(controller, hosts["pa1"])["fencing"]["vm01"] == {"epoch": 3, "role": "primary"}
    assert _render(controller, hosts["rb1"])["fencing"]["vm01"]["role"] == "replica"
    assert "finish the remaining steps" in str(job), job


def test_the_replica_cannot_move_while_the_machine_is_away_from_its_primary(controller):
    """PATCH replica_host moved a machine's replica to another recovery host while the machine ran on its
    replica host (failed over, committed, reversed, a test failover or a failover-family job under way): the
    controller then named a host that holds nothing as the one running the machine, and reverse or failback
    asked it to stop a machine it never had. Refused (409) until the machine is forward again."""
    from .helpers import add_host, deployment
    from .test_failback_rules import _committed, _report
    c = controller.client
    hosts = deployment(controller)
    hosts["rb2"] = add_host(controller.store, "rb2", "b")
    ok(c.put("/v1/hosts/rb2/cloud", json={"cloud": "silver"}))
    _committed(controller, hosts)
    refused(c.patch("/v1/machines/vm01", json={"replica_host": "rb2"}), 409, "committed")
    rev = ok(c.post("/v1/machines/vm01/reverse"), 202)
    refused(c.patch("/v1/machines/vm01", json={"replica_host": "rb2"}), 409, "under way")
    _report(controller, hosts["pa1"], "vm01", rev, "accept-reverse", "succeeded")
    _report(controller, hosts["rb1"], "vm01", rev, "reverse", "succeeded")
    refused(c.patch("/v1/machines/vm01", json={"replica_host": "rb2"}), 409, "reversed")
    assert ok(c.get("/v1/machines/vm01"))["replica_host"] == "rb1"
    ok(c.patch("/v1/machines/vm01", json={"replica_host": "rb1"}))           # no move: allowed
    fb = ok(c.post("/v1/machines/vm01/failback"), 202)
    for host, op in (("rb1", "planned-failover"), ("pa1", "failover"), ("rb1", "accept-reverse"), ("pa1", "reverse")):
        _report(controller, hosts[host], "vm01", fb, op, "succeeded")
    assert ok(c.get("/v1/machines/vm01"))["direction"] == "forward"
    assert ok(c.patch("/v1/machines/vm01", json={"replica_host": "rb2"}))["replica_host"] == "rb2"
    # a test failover runs its copy on the replica host until it is cleaned up
    ok(c.post("/v1/machines", json={"name": "vm02", "cloud": "gold", "primary_host": "pa2", "replica_host": "rb1",
                                    "disks": ["/vms/vm02.vhdx"]}), 201)
    job = ok(c.post("/v1/machines/vm02/failover", json={"kind": "test"}), 202)
    _report(controller, hosts["rb1"], "vm02", job, job["params"]["op"], "succeeded", point=1)
    refused(c.patch("/v1/machines/vm02", json={"replica_host": "rb2"}), 409, "test failover")


def test_reverse_and_failback_of_a_disabled_machine_are_refused(controller):
    """A committed machine whose protection was then disabled was reversed anyway: the job asked its primary
    host to accept and its replica host to replicate back, while desired.py rendered no [replica] for a disabled
    machine on the primary host (nothing listened: the step could only fail)."""
    from .helpers import deployment
    from .test_failback_rules import _committed, _report
    c = controller.client
    hosts = deployment(controller)
    _committed(controller, hosts)
    ok(c.post("/v1/machines/vm01/disable"), 202)
    refused(c.post("/v1/machines/vm01/reverse"), 409, "disabled")
    ok(c.post("/v1/machines/vm01/enable"), 202)
    rev = ok(c.post("/v1/machines/vm01/reverse"), 202)
    _report(controller, hosts["pa1"], "vm01", rev, "accept-reverse", "succeeded")
    _report(controller, hosts["rb1"], "vm01", rev, "reverse", "succeeded")
    ok(c.post("/v1/machines/vm01/disable"), 202)
    refused(c.post("/v1/machines/vm01/failback"), 409, "disabled")
    assert ok(c.get("/v1/machines/vm01"))["direction"] == "reversed"


def test_a_report_with_nan_or_infinity_is_refused_on_both_databases(controller, tmp_path):
    """NaN and Infinity (Python's JSON reads them) in a host's status were stored as null on SQLite and refused
    by PostgreSQL with the database's own words: both now refuse the report in one line, and the last good one
    stands."""
    hosts = _fleet(controller, tmp_path)
    good = {"revision": 1, "status": {"machines": [], "replica": None}}
    ok(hosts["rb1"].post("/v1/hosts/self/report", json=good))
    for raw in ('{"x": NaN}', '{"x": [1, Infinity]}', '{"a": {"b": -Infinity}}'):
        body = '{"revision": 1, "status": %s}' % raw
        refused(hosts["rb1"].post("/v1/hosts/self/report", content=body, headers={"content-type": "application/json"}),
                422, "not finite")
    assert ok(controller.client.get("/v1/hosts/rb1/report"))["status"] == good["status"]

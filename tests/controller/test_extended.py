"""Extended replication in the management plane (issue 17 item 5), on SQLite and PostgreSQL: a pair's extended
leg to a third cloud through the REST API, checked by replicatord's own parsers; each machine's extended replica
placed on a host of that cloud and kept there; the replica host given `[[extended]]`, the third-site host a
`[replica]` that allows the replica hosts -- both accepted by replicatord's settings loader -- and the leg's
state shown on the machine from the replica host's report. Also the Kerberos rendering of a pair's replica
hosts (issue 14)."""
from __future__ import annotations

from replicator.controller import desired
from replicator.controller import models as m
from replicator.orchestration.settings import parse_config_data

from .helpers import add_host, deployment, ok, refused

LEG = {"cloud": "bronze", "frequency": "15m", "additional_points": 2, "bandwidth_limit": "10M"}


def _third_site(ctl) -> dict:
    """The gold-silver deployment (helpers.deployment) with a third site c, cloud bronze and hosts tc1, tc2."""
    hosts = deployment(ctl)
    c = ctl.client
    ok(c.post("/v1/sites", json={"name": "c"}), 201)
    ok(c.post("/v1/clouds", json={"name": "bronze", "site": "c"}), 201)
    for name in ("tc1", "tc2"):
        hosts[name] = add_host(ctl.store, name, "c")
        ok(c.put(f"/v1/hosts/{name}/cloud", json={"cloud": "bronze"}))
    return hosts


def _render(ctl, host_id: str, tmp_path):
    """A host's rendering, and what replicatord's settings loader makes of it (raises on any problem)."""
    with ctl.store.session() as s:
        cfg = desired.render(s, s.get(m.Host, host_id))["config"]
    return cfg, parse_config_data(cfg, base_dir=str(tmp_path / host_id / "controller"), allow_empty=True)


def test_extended_leg_is_rendered_for_the_replica_and_the_third_site(controller, tmp_path):
    ctl, c = controller, controller.client
    hosts = _third_site(ctl)
    ok(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1",
                                    "disks": ["/srv/vm01.vhdx"]}), 201)
    assert "extended" not in _render(ctl, hosts["rb1"], tmp_path)[0]            # no leg yet
    leg = ok(c.post("/v1/pairs/gold-silver/extended", json=LEG), 201)
    assert (leg["cloud"], leg["frequency"], leg["bandwidth_limit"]) == ("bronze", 900, 10 << 20)
    assert leg["machines"] == {"vm01": "tc1"}                                    # the least loaded, by name
    ok(c.post("/v1/machines", json={"name": "vm02", "cloud": "gold", "primary_host": "pa2",
                                    "disks": ["/srv/vm02.vhdx"]}), 201)
    assert ok(c.get("/v1/pairs/gold-silver/extended"))["machines"] == {"vm01": "tc1", "vm02": "tc2"}
    assert ok(c.get("/v1/pairs/gold-silver"))["extended"] == "bronze"

    cfg, config = _render(ctl, hosts["rb1"], tmp_path)
    allow = {a["principal"]: a for a in cfg["replica"]["allow"]}
    assert [x["machine"] for x in cfg["extended"]] == ["vm01", "vm02"]
    vm01 = cfg["extended"][0]
    assert vm01 == {"machine": "vm01", "target": "https://tc1:8084", "frequency": 900, "additional_points": 2,
                    "compression": True, "bandwidth_limit": 10 << 20, "storage": allow[hosts["pa1"]]["storage"],
                    "trust_group": "gold-silver", "cert": "host.pem", "key": "host.key", "ca": "ca.pem"}
    parsed = {x.machine: x for x in config.extended}
    assert parsed["vm01"].target == "https://tc1:8084" and parsed["vm01"].frequency == 900
    assert parsed["vm02"].target == "https://tc2:8084"
    assert parsed["vm01"].storage == str(tmp_path / hosts["rb1"] / "replica")
    assert parsed["vm01"].cert == str(tmp_path / hosts["rb1"] / "controller" / "host.pem")

    for third, machine in (("tc1", "vm01"), ("tc2", "vm02")):
        cfg, config = _render(ctl, hosts[third], tmp_path)
        assert cfg["replica"]["allow"] == [{"principal": hosts["rb1"], "storage": "../replica",
                                            "trust_group": "gold-silver"}]
        assert "extended" not in cfg and "machine" not in cfg
        assert config.replica.allow[0].principal == hosts["rb1"]

    # the machine shows the relationship; its state comes with the replica host's report
    shown = ok(c.get("/v1/machines/vm01"))["extended"]
    assert shown == {"relationship": "Extended", "cloud": "bronze", "host": "tc1", "target": "https://tc1:8084",
                     "state": None, "health": None, "reason": None, "last_success_at": None}
    with ctl.store.session() as s:
        s.get(m.Host, hosts["rb1"]).last_report = {"status": {"machines": [], "replica": {"extended": [
            {"machine": "vm01", "relationship": "Extended", "state": "Replicating", "reason": None,
             "stats": {"health": "Normal", "last_replication_time": 1796000000.5}}]}}}
    shown = ok(c.get("/v1/machines/vm01"))["extended"]
    assert (shown["state"], shown["health"], shown["last_success_at"][:19]) == \
        ("Replicating", "Normal", "2026-11-30T00:53:20")
    assert ok(c.get("/v1/machines/vm02"))["extended"]["state"] is None

    # placements stay when a host joins the third cloud; a host holding extended replicas stays in its cloud
    ok(c.put("/v1/hosts/tc2/cloud", json={"cloud": None}), 409)
    ok(c.delete("/v1/pairs/gold-silver/extended"), 204)
    assert "extended" not in _render(ctl, hosts["rb1"], tmp_path)[0]
    assert "replica" not in _render(ctl, hosts["tc1"], tmp_path)[0]
    assert ok(c.get("/v1/machines/vm01"))["extended"] is None
    refused(c.get("/v1/pairs/gold-silver/extended"), 404, "has no extended leg")
    ok(c.put("/v1/hosts/tc2/cloud", json={"cloud": None}))


def test_a_third_cloud_without_hosts_places_machines_when_one_joins(controller, tmp_path):
    ctl, c = controller, controller.client
    hosts = deployment(ctl)
    ok(c.post("/v1/sites", json={"name": "c"}), 201)
    ok(c.post("/v1/clouds", json={"name": "bronze", "site": "c"}), 201)
    ok(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1",
                                    "disks": ["/srv/vm01.vhdx"]}), 201)
    assert ok(c.post("/v1/pairs/gold-silver/extended", json={"cloud": "bronze"}), 201)["machines"] == \
        {"vm01": None}
    assert "extended" not in _render(ctl, hosts["rb1"], tmp_path)[0]           # nowhere to send yet
    tc1 = add_host(ctl.store, "tc1", "c")
    ok(c.put("/v1/hosts/tc1/cloud", json={"cloud": "bronze"}))
    assert ok(c.get("/v1/pairs/gold-silver/extended"))["machines"] == {"vm01": "tc1"}
    assert _render(ctl, hosts["rb1"], tmp_path)[0]["extended"][0]["target"] == "https://tc1:8084"
    tc0 = add_host(ctl.store, "tc0", "c")                                         # a less loaded host later
    ok(c.put("/v1/hosts/tc0/cloud", json={"cloud": "bronze"}))
    assert ok(c.get("/v1/pairs/gold-silver/extended"))["machines"] == {"vm01": "tc1"}   # kept where its disks are
    assert "replica" in _render(ctl, tc1, tmp_path)[0] and "replica" in _render(ctl, tc0, tmp_path)[0]


def test_bad_extended_legs_are_refused_in_one_line(controller):
    ctl, c = controller, controller.client
    _third_site(ctl)
    path = "/v1/pairs/gold-silver/extended"
    refused(c.post(path, json={**LEG, "frequency": "30s"}), 422, "5m or 15m")
    refused(c.post(path, json={**LEG, "frequency": "1h"}), 422, "must be 30s, 5m or 15m")
    refused(c.post(path, json={**LEG, "bandwidth_limit": "fast"}), 422, "bytes per second")
    refused(c.post(path, json={**LEG, "additional_points": 25}), 422, "additional_points")
    refused(c.post(path, json={**LEG, "auth": "ntlm"}), 422, "auth")
    refused(c.post(path, json={**LEG, "cloud": "nowhere"}), 422, "cloud: no cloud 'nowhere'")
    refused(c.post(path, json={**LEG, "cloud": "silver"}), 422, "is in pair 'gold-silver'")
    ok(c.post("/v1/clouds", json={"name": "gold2", "site": "a"}), 201)
    refused(c.post(path, json={**LEG, "cloud": "gold2"}), 422, "one of the pair's sites")
    refused(c.post("/v1/pairs/nopair/extended", json=LEG), 404, "no pair 'nopair'")
    # the leg runs no more often than the pair's policy (p5: 5 minutes); so a 15m policy refuses a 5m leg
    ok(c.post("/v1/policies", json={"name": "p15", "frequency": "15m"}), 201)
    ok(c.put("/v1/pairs/gold-silver/policy", json={"policy": "p15"}))
    refused(c.post(path, json={**LEG, "frequency": "5m"}), 422, "more often than policy 'p15'")
    ok(c.put("/v1/pairs/gold-silver/policy", json={"policy": "p5"}))
    ok(c.post(path, json={**LEG, "frequency": "5m"}), 201)
    refused(c.post(path, json=LEG), 409, "already has an extended leg")
    # and the pair's policy cannot then become slower than the leg, nor be dropped
    refused(c.put("/v1/pairs/gold-silver/policy", json={"policy": "p15"}), 409, "more often than policy 'p15'")
    refused(c.put("/v1/pairs/gold-silver/policy", json={"policy": None}), 409, "extended leg")
    p5 = ok(c.get("/v1/policies/p5"))
    body = {k: p5[k] for k in ("name", "additional_points", "app_consistent_hours")} | {"frequency": "15m"}
    refused(c.put("/v1/policies/p5", json=body), 409, "pair 'gold-silver'")
    # the third cloud has one role
    refused(c.post("/v1/pairs", json={"name": "x", "primary": "bronze", "recovery": "gold2"}), 409,
            "extended cloud of pair 'gold-silver'")
    refused(c.delete("/v1/clouds/bronze"), 409, "extended cloud of pair 'gold-silver'")
    ok(c.post("/v1/sites", json={"name": "d"}), 201)
    ok(c.post("/v1/clouds", json={"name": "gold-d", "site": "d"}), 201)
    ok(c.post("/v1/clouds", json={"name": "silver-c", "site": "c"}), 201)
    ok(c.post("/v1/pairs", json={"name": "other", "primary": "gold2", "recovery": "gold-d", "policy": "p5"}), 201)
    refused(c.post("/v1/pairs/other/extended", json={"cloud": "bronze"}), 409, "already the extended cloud")


def test_kerberos_pairs_render_a_kerberos_replica_listener(controller, tmp_path):
    """Issue 14: a pair whose policy says auth = "kerberos" gets Kerberos replica hosts (HTTP with SPNEGO on
    the policy's port or 8083, primaries allowed by machine principal) and primaries aimed at them; an
    extended leg with auth = "kerberos" likewise."""
    ctl, c = controller, controller.client
    hosts = _third_site(ctl)
    ok(c.post("/v1/policies", json={"name": "krb", "frequency": "5m", "auth": "kerberos"}), 201)
    ok(c.put("/v1/pairs/gold-silver/policy", json={"policy": "krb"}))
    ok(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1",
                                    "disks": ["/srv/vm01.vhdx"]}), 201)
    cfg, config = _render(ctl, hosts["rb1"], tmp_path)
    rep = cfg["replica"]
    assert rep["auth"] == "kerberos" and rep["port"] == 8083 and not {"cert", "key", "ca"} & set(rep)
    assert {a["principal"] for a in rep["allow"]} == {"host/pa1@*", "host/pa2@*"}
    assert (config.replica.auth, config.replica.port, config.replica.cert) == ("kerberos", 8083, None)
    cfg, config = _render(ctl, hosts["pa1"], tmp_path)
    assert cfg["machine"][0]["target"] == "http://rb1:8083" and cfg["machine"][0]["auth"] == "kerberos"
    assert config.machines[0].protection.auth == "kerberos"
    # the replica host has one listener: a machine's own policy must authenticate as the pair's does
    ok(c.post("/v1/policies", json={"name": "cert5", "frequency": "5m"}), 201)
    refused(c.post("/v1/machines", json={"name": "vm02", "cloud": "gold", "primary_host": "pa2",
                                         "disks": ["/srv/vm02.vhdx"], "policy": "cert5"}), 422,
            "authenticates by certificate")
    refused(c.patch("/v1/machines/vm01", json={"policy": "cert5"}), 422, "authenticates by certificate")
    # nor can the pair's policy, or a machine's own, change authentication under the other
    ok(c.post("/v1/policies", json={"name": "krb2", "frequency": "5m", "auth": "kerberos"}), 201)
    ok(c.patch("/v1/machines/vm01", json={"policy": "krb2"}))
    refused(c.put("/v1/pairs/gold-silver/policy", json={"policy": "cert5"}), 409, "machine 'vm01' follows policy")
    refused(c.put("/v1/policies/krb2", json={"name": "krb2", "frequency": "5m"}), 409, "would listen for kerberos")
    refused(c.put("/v1/policies/krb", json={"name": "krb", "frequency": "5m"}), 409, "would listen for certificate")
    ok(c.patch("/v1/machines/vm01", json={"policy": None}))
    # a policy's own port moves the Kerberos listener and the primaries' target together
    krb = ok(c.get("/v1/policies/krb"))
    ok(c.put("/v1/policies/krb", json={"name": "krb", "frequency": krb["frequency"], "auth": "kerberos",
                                       "port": 9083}))
    assert _render(ctl, hosts["rb1"], tmp_path)[0]["replica"]["port"] == 9083
    assert _render(ctl, hosts["pa1"], tmp_path)[0]["machine"][0]["target"] == "http://rb1:9083"

    # a Kerberos extended leg: rb1 sends over http to tc1's Kerberos listener, which allows rb1's principal
    ok(c.post("/v1/pairs/gold-silver/extended", json={**LEG, "auth": "kerberos"}), 201)
    cfg, config = _render(ctl, hosts["rb1"], tmp_path)
    leg = cfg["extended"][0]
    assert leg["target"] == "http://tc1:8083" and leg["auth"] == "kerberos" and "cert" not in leg
    assert config.extended[0].kerberos
    cfg, config = _render(ctl, hosts["tc1"], tmp_path)
    assert cfg["replica"]["auth"] == "kerberos" and cfg["replica"]["port"] == 8083
    assert cfg["replica"]["allow"][0]["principal"] == "host/rb1@*"
    assert config.replica.auth == "kerberos"


def test_a_policy_port_moves_the_certificate_listener_and_the_targets(controller, tmp_path):
    ctl, c = controller, controller.client
    hosts = deployment(ctl)
    ok(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1",
                                    "disks": ["/srv/vm01.vhdx"]}), 201)
    assert _render(ctl, hosts["rb1"], tmp_path)[0]["replica"]["port"] == 8084           # its data URL's
    p5 = ok(c.get("/v1/policies/p5"))
    ok(c.put("/v1/policies/p5", json={**{k: p5[k] for k in ("name", "frequency", "additional_points",
                                                            "app_consistent_hours")}, "port": 9084}))
    cfg, config = _render(ctl, hosts["rb1"], tmp_path)
    assert cfg["replica"]["port"] == 9084 and config.replica.port == 9084
    assert _render(ctl, hosts["pa1"], tmp_path)[0]["machine"][0]["target"] == "https://rb1:9084"

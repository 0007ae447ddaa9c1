"""Machines, jobs, failover requests and recovery plans through the REST API, on SQLite and PostgreSQL."""
from __future__ import annotations

from sqlalchemy import select

from replicator.controller import jobs as jobq
from replicator.controller import models as m

from .helpers import add_host, deployment, ok, refused


def revisions(c) -> dict:
    return {h["hostname"]: (h["desired_revision"], h["id"]) for h in ok(c.get("/v1/hosts"))}


def test_enable_protection_places_the_machine_and_waits_for_its_host(controller):
    c = controller.client
    hosts = deployment(controller)
    refused(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "domain": "vm01"}), 422,
            "cloud 'gold' has 2 hosts")
    refused(c.post("/v1/machines", json={"name": "vm01", "cloud": "silver", "domain": "vm01"}), 422,
            "not the primary cloud")
    ok(c.post("/v1/sites", json={"name": "c"}), 201)
    ok(c.post("/v1/clouds", json={"name": "empty", "site": "c"}), 201)
    ok(c.post("/v1/clouds", json={"name": "empty-dr", "site": "b"}), 201)
    ok(c.post("/v1/pairs", json={"name": "e", "primary": "empty", "recovery": "empty-dr", "policy": "p5"}), 201)
    refused(c.post("/v1/machines", json={"name": "vm01", "cloud": "empty", "domain": "vm01"}), 422,
            "'empty' has no hosts yet")
    refused(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "rb1",
                                         "domain": "vm01"}), 422, "not in cloud 'gold'")
    refused(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1"}), 422,
            "either domain")
    refused(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1",
                                         "disks": ["/vm/a.vhdx", "/vm/a.vhdx"]}), 422, "listed twice")
    before = revisions(c)
    x = ok(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1",
                                        "domain": "vm01", "excluded": ["vdb"]}), 201)
    assert (x["primary_host"], x["replica_host"], x["policy"], x["desired_state"]) == ("pa1", "rb1", "p5",
                                                                                       "enabled")
    assert (x["owner_site"], x["fencing_epoch"], x["excluded"]) == ("a", 1, ["vdb"])
    after = revisions(c)
    assert after["pa1"][0] == before["pa1"][0] + 1 and after["rb1"][0] == before["rb1"][0] + 1
    assert after["pa2"][0] == before["pa2"][0]
    refused(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1",
                                         "domain": "vm01"}), 409, "already protected")
    [job] = ok(c.get("/v1/jobs", params={"machine": "vm01"}))
    assert (job["kind"], job["state"], job["host"]) == ("enable-protection", "queued", hosts["pa1"])
    assert job["params"]["revision"] == after["pa1"][0]
    assert f"waiting for host pa1 to apply desired revision {after['pa1'][0]}" in job["message"]
    assert [x["name"] for x in ok(c.get("/v1/machines", params={"cloud": "gold"}))] == ["vm01"]
    assert ok(c.get("/v1/machines", params={"cloud": "silver"})) == []


def test_machine_actions_are_desired_state_changes_and_jobs(controller):
    c = controller.client
    deployment(controller)
    ok(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa2",
                                    "disks": ["/vm/vm01.vhdx"]}), 201)
    refused(c.post("/v1/machines/vm01/resume"), 409, "is enabled: resume applies to paused")
    job = ok(c.post("/v1/machines/vm01/pause"), 202)
    assert (job["kind"], job["state"], job["machine"]) == ("pause-protection", "queued", "vm01")
    assert ok(c.get("/v1/machines/vm01"))["desired_state"] == "paused"
    refused(c.post("/v1/machines/vm01/resync"), 409, "is paused")
    ok(c.post("/v1/machines/vm01/resume"), 202)
    assert ok(c.post("/v1/machines/vm01/resync"), 202)["kind"] == "resync"
    refused(c.delete("/v1/machines/vm01"), 409, "disable its protection first")
    ok(c.post("/v1/machines/vm01/disable"), 202)
    refused(c.post("/v1/machines/vm01/failover", json={"kind": "test"}), 409, "not protected")
    ok(c.post("/v1/machines/vm01/enable"), 202)
    kinds = [j["kind"] for j in ok(c.get("/v1/jobs", params={"machine": "vm01"}))]
    assert kinds == ["enable-protection", "disable-protection", "resync", "resume-protection", "pause-protection",
                     "enable-protection"]
    refused(c.post("/v1/machines/ghost/pause"), 404, "no machine 'ghost'")
    with controller.store.session() as s:
        assert s.query(m.Machine).filter_by(name="vm01").one().resync_requested == 1


def test_failover_request_is_a_job_waiting_for_its_host_not_a_success(controller):
    c = controller.client
    hosts = deployment(controller)
    ok(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1", "domain": "d"}), 201)
    refused(c.post("/v1/machines/vm01/failover", json={"kind": "sideways"}), 422, "kind")
    job = ok(c.post("/v1/machines/vm01/failover", json={"kind": "unplanned", "force": True}), 202)
    assert (job["kind"], job["state"], job["host"]) == ("failover", "queued", hosts["rb1"])
    assert job["params"] == {"kind": "unplanned", "force": True, "epoch_from": 1, "epoch_to": 2, "op": "failover",
                             "point": None}
    full = ok(c.get(f"/v1/jobs/{job['id']}"))
    assert "failover: waiting for host rb1 to run it" in full["message"]
    assert any("force given by admin, not needed" in line["line"] for line in full["log"])   # no live lease
    refused(c.post("/v1/machines/vm01/failover", json={"kind": "planned"}), 409, "under way")
    ok(c.post("/v1/machines", json={"name": "vm02", "cloud": "gold", "primary_host": "pa2", "domain": "d"}), 201)
    planned = ok(c.post("/v1/machines/vm02/failover", json={"kind": "planned"}), 202)
    assert planned["host"] == hosts["pa2"], "a planned failover starts on the primary"


def test_jobs_list_get_cancel(controller):
    c = controller.client
    deployment(controller)
    ok(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1", "domain": "d"}), 201)
    [queued] = ok(c.get("/v1/jobs", params={"state": "queued"}))
    refused(c.get("/v1/jobs", params={"state": "bogus"}), 422, "state")
    refused(c.get("/v1/jobs/999999"), 404, "no job 999999")
    cancelled = ok(c.post(f"/v1/jobs/{queued['id']}/cancel"))
    assert cancelled["state"] == "cancelled" and cancelled["finished_at"]
    assert cancelled["log"][-1]["line"] == "cancelled by admin"
    refused(c.post(f"/v1/jobs/{queued['id']}/cancel"), 409, "already cancelled")
    # a job a worker holds under a live lease is asked to stop, not yanked from under it
    job = ok(c.post("/v1/machines/vm01/pause"), 202)
    claimed = jobq.claim(controller.store, "worker-1", host_id=job["host"])
    assert claimed.id == job["id"]
    asked = ok(c.post(f"/v1/jobs/{job['id']}/cancel"))
    assert (asked["state"], asked["cancel_requested"]) == ("running", True)
    assert jobq.finish(controller.store, job["id"], "worker-1", "cancelled", "stopped on request")
    assert ok(c.get(f"/v1/jobs/{job['id']}"))["state"] == "cancelled"


def test_recovery_plans_runs_and_manual_confirmation(controller):
    c = controller.client
    deployment(controller)
    for name, host in (("web", "pa1"), ("db", "pa2")):
        ok(c.post("/v1/machines", json={"name": name, "cloud": "gold", "primary_host": host, "domain": name}), 201)
    plan = {"name": "app", "pair": "gold-silver", "groups": [
        {"members": ["db"], "post": [{"manual": "check the database"}]},
        {"members": ["web"], "pre": [{"script": ["/usr/local/bin/dns-switch", "dr"], "timeout": 60,
                                      "kinds": ["planned", "unplanned"]}]}]}
    created = ok(c.post("/v1/plans", json=plan), 201)
    assert [g["members"] for g in created["groups"]] == [["db"], ["web"]]
    assert created["groups"][1]["pre"][0]["script"] == ["/usr/local/bin/dns-switch", "dr"]
    refused(c.post("/v1/plans", json=plan), 409, "already exists")
    refused(c.post("/v1/plans", json={**plan, "name": "twice", "groups": [{"members": ["db"]},
                                                                          {"members": ["db"]}]}), 422,
            "'db' is in group 1 and group 2")
    refused(c.post("/v1/plans", json={**plan, "name": "ghost", "groups": [{"members": ["nope"]}]}), 422,
            "no machine 'nope'")
    refused(c.post("/v1/plans", json={**plan, "name": "many", "groups": [{"members": [f"m{i}"]} for i in range(8)]}),
            422, "groups")
    refused(c.post("/v1/plans", json={**plan, "name": "both", "groups": [{"pre": [{"script": ["x"],
                                                                                   "manual": "y"}]}]}), 422,
            "exactly one of script")

    run = ok(c.post("/v1/plans/app/runs", json={"kind": "test"}), 202)
    assert (run["state"], run["kind"], run["plan"]) == ("queued", "test", "app")
    job = ok(c.get(f"/v1/jobs/{run['job']}"))
    assert job["kind"] == "plan-run" and job["state"] == "queued" and "waiting for a worker" in job["message"]
    refused(c.post("/v1/plans/app/runs", json={"kind": "planned"}), 409, "already has a run in progress")
    refused(c.put("/v1/plans/app", json=plan), 409, "run in progress")
    refused(c.post(f"/v1/plan-runs/{run['id']}/confirm", json={"action_id": 1}), 409, "not waiting")

    # the worker driving the run reaches the manual action (as the plan executor records it)
    manual_id = created["groups"][0]["post"][0]["id"]
    with controller.store.session() as s:
        r = s.get(m.PlanRun, run["id"])
        r.state, r.current_group, r.waiting_action_id = "waiting_for_input", 1, manual_id
    refused(c.post(f"/v1/plan-runs/{run['id']}/confirm", json={"action_id": manual_id + 1}), 409,
            f"waits on action {manual_id}")
    done = ok(c.post(f"/v1/plan-runs/{run['id']}/confirm", json={"action_id": manual_id, "note": "db ok"}))
    assert done["state"] == "running" and done["waiting_action_id"] is None
    assert done["confirmations"][0]["by"] == "admin" and done["confirmations"][0]["note"] == "db ok"
    assert any("confirmed by admin: db ok" in x["line"] for x in ok(c.get(f"/v1/jobs/{run['job']}"))["log"])
    assert [x["id"] for x in ok(c.get("/v1/plans/app/runs"))] == [run["id"]]
    refused(c.get("/v1/plan-runs/424242"), 404)

    with controller.store.session() as s:
        s.get(m.PlanRun, run["id"]).state = "succeeded"
    swapped = ok(c.put("/v1/plans/app", json={**plan, "groups": [{"members": ["web", "db"]}]}))
    assert swapped["groups"] == [{"position": 1, "members": ["db", "web"], "pre": [], "post": []}]
    ok(c.post("/v1/machines/db/disable"), 202)
    refused(c.delete("/v1/machines/db"), 409, "in a recovery plan")
    assert c.delete("/v1/plans/app").status_code == 204
    before = revisions(c)
    assert c.delete("/v1/machines/db").status_code == 204
    after = revisions(c)
    assert (after["pa2"][0], after["rb1"][0], after["pa1"][0]) == (before["pa2"][0] + 1, before["rb1"][0] + 1,
                                                                   before["pa1"][0])


def test_change_a_machines_policy_or_move_its_replica(controller):
    c = controller.client
    hosts = deployment(controller)
    add_host(controller.store, "rb2", "b")
    ok(c.put("/v1/hosts/rb2/cloud", json={"cloud": "silver"}))
    ok(c.post("/v1/policies", json={"name": "p30", "frequency": "30s"}), 201)
    ok(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1", "domain": "d"}), 201)
    assert ok(c.get("/v1/machines/vm01"))["replica_host"] == "rb1"
    before = revisions(c)
    x = ok(c.patch("/v1/machines/vm01", json={"policy": "p30", "replica_host": "rb2"}))
    assert (x["policy"], x["replica_host"]) == ("p30", "rb2")
    after = revisions(c)
    assert {h: after[h][0] - before[h][0] for h in after} == {"pa1": 1, "pa2": 0, "rb1": 1, "rb2": 1}
    [job] = ok(c.get("/v1/jobs", params={"kind": "reconfigure-protection"}))
    assert job["host"] == hosts["pa1"] and job["params"]["changes"] == ["policy p30", "replica moves to rb2"]
    assert ok(c.patch("/v1/machines/vm01", json={"policy": None}))["policy"] == "p5", "back to the pair's"
    refused(c.patch("/v1/machines/vm01", json={"replica_host": "pa2"}), 422, "not in the recovery cloud")
    refused(c.patch("/v1/machines/vm01", json={"replica_host": None}), 422, "needs a replica host")
    refused(c.patch("/v1/machines/vm01", json={"policy": "ghost"}), 422, "no policy 'ghost'")
    refused(c.patch("/v1/machines/ghost", json={}), 404)
    assert ok(c.patch("/v1/machines/vm01", json={}))["replica_host"] == "rb2"
    assert len(ok(c.get("/v1/jobs", params={"kind": "reconfigure-protection"}))) == 2, "no change, no job"


def test_a_domain_machine_with_its_disk_map_is_rendered_to_its_host(controller, tmp_path):
    """A libvirt domain enabled with its disk targets mapped to VHDX files reaches its primary host as
    replicatord.toml would say it (`domain`, `disks = { vda = ... }`), accepted by replicatord's parser; the map
    is checked like the file (a list for a domain, a map without one: one line each)."""
    from replicator.controller import desired
    from replicator.controller import models as m
    from replicator.orchestration.settings import parse_config_data
    deployment(controller)
    c = controller.client
    for body, why in (({"domain": "web1", "disks": ["/vm/a.vhdx"]}, "not a list"),
                      ({"disks": {"vda": "/vm/a.vhdx"}}, "only a domain maps"),
                      ({"domain": "web1", "disks": {"VDA!": "/vm/a.vhdx"}}, "disks"),
                      ({"domain": "web1", "disks": {"vda": "/vm/a.vhdx", "vdb": "/vm/a.vhdx"}}, "listed twice")):
        refused(c.post("/v1/machines", json={"name": "web1", "cloud": "gold", "primary_host": "pa1", **body}), 422, why)
    x = ok(c.post("/v1/machines", json={"name": "web1", "cloud": "gold", "primary_host": "pa1", "domain": "web1",
                                        "disks": {"vda": "/vm/web1-os.vhdx", "vdb": "/vm/web1-data.vhdx"},
                                        "excluded": ["vdc"]}), 201)
    assert x["disks"] == {"vda": "/vm/web1-os.vhdx", "vdb": "/vm/web1-data.vhdx"}
    with controller.store.session() as s:
        host = s.scalars(select(m.Host).where(m.Host.hostname == "pa1")).one()
        cfg = desired.render(s, host)["config"]
    [entry] = [e for e in cfg["machine"] if e["name"] == "web1"]
    assert entry["domain"] == "web1" and entry["disks"] == {"vda": "/vm/web1-os.vhdx", "vdb": "/vm/web1-data.vhdx"}
    config = parse_config_data(cfg, base_dir=str(tmp_path))
    [web1] = [mm for mm in config.machines if mm.name == "web1"]
    assert web1.domain == "web1" and dict(web1.targets) == {"vda": "/vm/web1-os.vhdx", "vdb": "/vm/web1-data.vhdx"}

"""Failover through the controller (issue 14, items 4 and 6): three replicatord processes registered to a real
replicator-controller (on PostgreSQL only: see `database_url_pg` in conftest.py), machines replicating
from p1 and p2 to r1.

- unplanned: refused while p1 holds a live lease (the error names the host and its report's age), accepted with
  force (an audit entry); r1 runs the failover; the machine belongs to site west at epoch 2; p1's next cycle is
  refused (fenced) and its report says so; cancel-failover gives it back and p1 cycles again at epoch 2.
- planned: p2's final cycle, then r1's planned failover: the failed-over disk is byte for byte p2's disk at its
  final cycle (nothing lost); commit-failover ends it. A test failover and its cleanup run on r1 first.
- a recovery plan's test failover runs group by group through the hosts, waiting on a manual action.
Without hosts (the app and the real store): a failover job cancelled before a host ran it, what hosts report of
a step (failover.follow), and the plan worker's script and manual actions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error

from replicator.vhdx import create_vhdx

from ..daemon.two_sites import read_vhdx, same
from .test_fleet import FleetHost, wait
from .test_host_channel import ControllerProc

MiB = 1 << 20
BIN = os.path.dirname(sys.executable)


def _setup(tmp_path, ctl: ControllerProc, hosts: list) -> dict:
    for site in ("east", "west"):
        ctl.ok("POST", "/v1/sites", {"name": site})
    p1, p2 = (FleetHost(tmp_path, n, ctl, ctl.key_file(tmp_path, "east")) for n in ("p1", "p2"))
    r1 = FleetHost(tmp_path, "r1", ctl, ctl.key_file(tmp_path, "west"))
    hosts += [p1, p2, r1]
    disks = {}
    for k, h in enumerate((p1, p2)):
        (h.dir / "disks").mkdir()
        disks[h.name] = h.dir / "disks" / f"{h.name}-os.vhdx"
        with create_vhdx(str(disks[h.name]), 8 * MiB, block_size=MiB) as d:
            d.write(0, bytes([0x50 + k]) * MiB)
            d.write(4 * MiB, os.urandom(MiB))
    for h in hosts:
        h.start()
    wait(lambda: len(ctl.ok("GET", "/v1/hosts")) == 3, "three hosts registered", hosts)
    ctl.ok("POST", "/v1/clouds", {"name": "gold", "site": "east"})
    ctl.ok("POST", "/v1/clouds", {"name": "gold-dr", "site": "west"})
    for h, cloud in ((p1, "gold"), (p2, "gold"), (r1, "gold-dr")):
        ctl.ok("PUT", f"/v1/hosts/{h.name}/cloud", {"cloud": cloud})
    ctl.ok("POST", "/v1/policies", {"name": "slow", "frequency": "15m"})
    ctl.ok("POST", "/v1/pairs", {"name": "gold-pair", "primary": "gold", "recovery": "gold-dr", "policy": "slow"})
    ctl.ok("POST", "/v1/pairs/gold-pair/storage-mappings",
           {"source": str(tmp_path), "target": str(tmp_path / "r1" / "replica-store")})
    for h, vm in ((p1, "vm01"), (p2, "vm02")):
        ctl.ok("POST", "/v1/machines", {"name": vm, "cloud": "gold", "primary_host": h.name,
                                        "disks": [str(disks[h.name])]})
    for h, vm in ((p1, "vm01"), (p2, "vm02")):
        wait(lambda h=h, vm=vm: h.machine(vm)["state"] == "Replicating"
             and h.machine(vm)["stats"]["successful_cycles"] >= 1, f"{vm} replicating on {h.name}", hosts, 90)
    return {"p1": p1, "p2": p2, "r1": r1, "disks": disks}


def _job_done(ctl, job_id: int, hosts, timeout: float = 60) -> dict:
    wait(lambda: ctl.ok("GET", f"/v1/jobs/{job_id}")["state"] in ("succeeded", "failed", "cancelled"),
         f"job {job_id}", hosts, timeout)
    job = ctl.ok("GET", f"/v1/jobs/{job_id}")
    assert job["state"] == "succeeded", job
    return job


def _cycle(h: FleetHost, vm: str) -> tuple[int, dict]:
    try:
        return 200, h.api("POST", f"/v1/machines/{vm}/cycle?wait=1")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _settled(h: FleetHost, hosts) -> None:
    """The host runs the newest revision the controller has for it (no reload pending)."""
    def settled():
        c = h.api("GET", "/v1/status")["controller"]
        return c["revision"] == c["latest_revision"] and os.path.exists(h.state / "nbd")
    wait(settled, f"{h.name} on its newest revision", hosts)


def _get(h: FleetHost, path: str, hosts) -> dict:
    """A host's admin API answer, waiting out a reload (the listener restarts on a new revision)."""
    got: list = []
    wait(lambda: got.append(h.api("GET", path)) or True, f"{h.name} GET {path}", hosts)
    return got[-1]


def _reported(ctl, host: str, vm: str) -> dict:
    """The machine's entry in the host's last report (StopIteration, which wait() retries, before it is in)."""
    return next(x for x in ctl.ok("GET", f"/v1/hosts/{host}/report")["status"]["machines"] if x["name"] == vm)


def _fencing(h: FleetHost) -> dict:
    return json.loads((h.state / "controller" / "fencing.json").read_text())["machines"]


def test_unplanned_failover_fences_the_old_primary(tmp_path, database_url_pg):
    ctl = ControllerProc(tmp_path, database_url_pg, cert_lifetime=3600).start()
    hosts: list[FleetHost] = []
    try:
        f = _setup(tmp_path, ctl, hosts)
        p1, r1 = f["p1"], f["r1"]
        p1.qemu_io("vm01", f["disks"]["p1"].name, "write -P 0x61 1M 1M")
        assert _cycle(p1, "vm01")[0] == 200
        wait(lambda: _reported(ctl, "p1", "vm01")["stats"]["successful_cycles"]
             >= 2, "p1's report of the cycle", hosts)

        # p1 is alive and replicating at epoch 1: refused without force, naming the host and its report's age
        code, body = ctl.api("POST", "/v1/machines/vm01/failover", {"kind": "unplanned"})
        assert code == 409 and "host p1" in body["error"] and " s ago" in body["error"] \
            and "force" in body["error"], body
        assert ctl.ok("GET", "/v1/machines/vm01")["fencing_epoch"] == 1
        job = ctl.ok("POST", "/v1/machines/vm01/failover", {"kind": "unplanned", "force": True})
        forced = [a for a in ctl.ok("GET", "/v1/audit") if a["action"] == "machine.failover.forced"]
        assert len(forced) == 1 and forced[0]["detail"]["forced"] is True and forced[0]["detail"]["epoch_from"] == 1 \
            and forced[0]["detail"]["epoch_to"] == 2 and forced[0]["detail"]["lease_age_seconds"] < 60, forced
        done = _job_done(ctl, job["id"], hosts)
        assert "r1 runs vm01" in done["message"] and "epoch 2" in done["message"], done
        assert any("forced by" in line["line"] for line in done["log"]), done["log"]
        vm01 = ctl.ok("GET", "/v1/machines/vm01")
        assert vm01["owner_site"] == "west" and vm01["fencing_epoch"] == 2, vm01
        view = _get(r1, "/v1/replica/machines/vm01", hosts)
        assert view["failover"]["kind"] == "unplanned" and [d["epoch"] for d in view["disks"]] == [2], view

        # p1 keeps epoch 1 (never raised for it); its next cycle is refused and it says why
        wait(lambda: _fencing(p1)["vm01"] == {"epoch": 1, "role": "replica"}
             and _fencing(r1)["vm01"] == {"epoch": 2, "role": "primary"}, "roles swapped", hosts)
        _settled(p1, hosts)
        code, answer = _cycle(p1, "vm01")
        wait(lambda: p1.machine("vm01")["fenced"] is not None, "p1 fenced", hosts)
        assert "fenced" in p1.machine("vm01")["reason"], (code, answer, p1.machine("vm01"))
        wait(lambda: _reported(ctl, "p1", "vm01")["fenced"] is not None,
             "p1's report saying fenced", hosts)
        said = _reported(ctl, "p1", "vm01")
        assert said["fenced"]["replica_epoch"] == 2 and said["fenced"]["failed_over"] is True, said

        # cancel-failover: the machine goes back to east with epoch 2, which lifts p1's fence
        code, body = ctl.api("POST", "/v1/machines/vm01/failover", {"kind": "unplanned", "force": True})
        assert code == 409 and "failed over already" in body["error"], body
        cli = [os.path.join(BIN, "replicator"), "--controller", ctl.url, "--token", str(ctl.data / "admin.token"),
               "--ca", ctl.ca_path, "machine"]
        said = subprocess.run(cli + ["commit-failover", "nope"], capture_output=True, text=True, timeout=60)
        assert said.returncode != 0 and said.stderr.count("\n") == 1 and "nope" in said.stderr, said
        said = subprocess.run(cli + ["cancel-failover", "vm01"], capture_output=True, text=True, timeout=60)
        assert said.returncode == 0, said.stderr
        done = _job_done(ctl, json.loads(said.stdout)["id"], hosts)
        vm01 = ctl.ok("GET", "/v1/machines/vm01")
        assert vm01["owner_site"] == "east" and vm01["fencing_epoch"] == 2, vm01
        wait(lambda: _fencing(p1)["vm01"] == {"epoch": 2, "role": "primary"}, "p1 at epoch 2", hosts)
        wait(lambda: p1.machine("vm01")["fenced"] is None and p1.machine("vm01")["epoch"] == 2, "fence lifted", hosts)
        p1.qemu_io("vm01", f["disks"]["p1"].name, "write -P 0x62 6M 1M")
        code, answer = _cycle(p1, "vm01")
        assert code == 200 and p1.machine("vm01")["state"] == "Replicating", (code, answer)
        code, body = ctl.api("POST", "/v1/machines/vm01/commit-failover")
        assert code == 409 and "no failover waiting" in body["error"], body
    finally:
        for h in hosts:
            h.stop()
        ctl.stop()


def test_planned_failover_loses_nothing(tmp_path, database_url_pg):
    ctl = ControllerProc(tmp_path, database_url_pg, cert_lifetime=3600).start()
    hosts: list[FleetHost] = []
    try:
        f = _setup(tmp_path, ctl, hosts)
        p2, r1, disk = f["p2"], f["r1"], f["disks"]["p2"]

        # a test failover on r1, then its cleanup: replication goes on untouched
        first = _get(r1, "/v1/replica/machines/vm02", hosts)["points"][0]["point"]       # at a chosen point
        test = ctl.ok("POST", "/v1/machines/vm02/failover", {"kind": "test", "point": first})
        done = _job_done(ctl, test["id"], hosts)
        assert f"test failover of vm02 at point {first}" in done["message"], done
        assert _get(r1, "/v1/replica/machines/vm02", hosts)["test_failover"] is not None
        code, body = ctl.api("POST", "/v1/machines/vm02/failover", {"kind": "test"})
        assert code == 409 and "clean it up first" in body["error"], body
        _job_done(ctl, ctl.ok("POST", "/v1/machines/vm02/cleanup-test-failover")["id"], hosts)
        assert _get(r1, "/v1/replica/machines/vm02", hosts)["test_failover"] is None
        assert ctl.ok("GET", "/v1/machines/vm02")["fencing_epoch"] == 1

        # the guest writes after the last cycle: the planned failover's final cycle carries it
        _settled(p2, hosts)
        p2.qemu_io("vm02", disk.name, "write -P 0x71 2M 1M", "write -P 0x72 7M 512k")
        job = ctl.ok("POST", "/v1/machines/vm02/failover", {"kind": "planned"})
        done = _job_done(ctl, job["id"], hosts, 90)
        lines = [line["line"] for line in done["log"]]
        assert any("final cycle replicated" in x for x in lines), lines
        wait(lambda: p2.machine("vm02")["state"] == "PreparedForFailover", "p2 prepared (after its reload)", hosts)
        view = _get(r1, "/v1/replica/machines/vm02", hosts)
        assert view["failover"]["kind"] == "planned", view
        (path,) = view["failover"]["paths"].values()
        same(read_vhdx(path), p2.disk_bytes(disk), "the failed-over disk")
        vm02 = ctl.ok("GET", "/v1/machines/vm02")
        assert vm02["owner_site"] == "west" and vm02["fencing_epoch"] == 2, vm02
        assert ctl.ok("GET", "/v1/audit?limit=500") and not [
            a for a in ctl.ok("GET", "/v1/audit?limit=500") if a["action"] == "machine.failover.forced"]
        _job_done(ctl, ctl.ok("POST", "/v1/machines/vm02/commit-failover")["id"], hosts)
        assert _get(r1, "/v1/replica/machines/vm02", hosts)["state"] == "FailedOver"
        code, body = ctl.api("POST", "/v1/machines/vm02/cancel-failover")
        assert code == 409, body
    finally:
        for h in hosts:
            h.stop()
        ctl.stop()


def test_a_failover_cancelled_before_a_host_ran_it_leaves_the_machine_with_its_primary(controller):
    """Epoch E+1 stays (epochs only rise) and the primary is handed it; the test failover after it is no
    longer refused as 'under way'. (API and rendering only: no host needed to show it.)"""
    from replicator.controller import desired
    from replicator.controller import models as m

    from .helpers import deployment, ok, refused
    c = controller.client
    hosts = deployment(controller)
    ok(c.post("/v1/machines", json={"name": "vm01", "cloud": "gold", "primary_host": "pa1",
                                    "disks": ["/vms/vm01.vhdx"]}), 201)
    job = ok(c.post("/v1/machines/vm01/failover", json={"kind": "unplanned"}), 202)
    vm01 = ok(c.get("/v1/machines/vm01"))
    assert (vm01["owner_site"], vm01["fencing_epoch"]) == ("b", 2)

    def fencing(host: str) -> dict:
        with controller.store.session() as s:
            return desired.render(s, s.get(m.Host, hosts[host]))["fencing"]["vm01"]
    assert fencing("pa1") == {"epoch": 1, "role": "replica"} and fencing("rb1") == {"epoch": 2, "role": "primary"}
    refused(c.post("/v1/machines/vm01/failover", json={"kind": "test"}), 409, "under way")
    ok(c.post(f"/v1/jobs/{job['id']}/cancel"))
    vm01 = ok(c.get("/v1/machines/vm01"))
    assert (vm01["owner_site"], vm01["fencing_epoch"]) == ("a", 2)
    assert fencing("pa1") == {"epoch": 2, "role": "primary"} and fencing("rb1") == {"epoch": 2, "role": "replica"}
    refused(c.post("/v1/machines/vm01/cancel-failover"), 409, "no failover waiting")
    refused(c.post("/v1/machines/vm01/failover", json={"kind": "planned", "point": 3}), 422, "point")
    test = ok(c.post("/v1/machines/vm01/failover", json={"kind": "test"}), 202)
    assert test["host"] == hosts["rb1"] and test["params"]["op"] == "test-failover"


def test_a_recovery_plan_runs_group_by_group_through_the_hosts(tmp_path, database_url_pg):
    """A test failover of a plan across two primaries' machines: group 1 (vm01 from p1), a manual action
    confirmed through the API, then group 2 (vm02 from p2); the controller's worker drives it, r1 runs both."""
    ctl = ControllerProc(tmp_path, database_url_pg, cert_lifetime=3600).start()
    hosts: list[FleetHost] = []
    try:
        f = _setup(tmp_path, ctl, hosts)
        r1 = f["r1"]
        ctl.ok("POST", "/v1/plans", {"name": "gold-plan", "pair": "gold-pair", "groups": [
            {"members": ["vm01"]},
            {"members": ["vm02"], "pre": [{"manual": "check the test network is isolated"}]}]})
        run = ctl.ok("POST", "/v1/plans/gold-plan/runs", {"kind": "test"})
        wait(lambda: ctl.ok("GET", f"/v1/plan-runs/{run['id']}")["state"] == "waiting_for_input",
             "the run waiting at group 2's manual action", hosts)
        waiting = ctl.ok("GET", f"/v1/plan-runs/{run['id']}")
        assert waiting["current_group"] == 2 and waiting["waiting_action_id"], waiting
        assert _get(r1, "/v1/replica/machines/vm01", hosts)["test_failover"] is not None     # group 1 is done
        assert _get(r1, "/v1/replica/machines/vm02", hosts)["test_failover"] is None         # group 2 waits
        ctl.ok("POST", f"/v1/plan-runs/{run['id']}/confirm",
               {"action_id": waiting["waiting_action_id"], "note": "isolated"})
        wait(lambda: ctl.ok("GET", f"/v1/plan-runs/{run['id']}")["state"] in ("succeeded", "failed"),
             "the run to end", hosts)
        done = ctl.ok("GET", f"/v1/plan-runs/{run['id']}")
        job = ctl.ok("GET", f"/v1/jobs/{done['job']}")
        assert done["state"] == "succeeded", job
        assert job["state"] == "succeeded" and job["claimed_by"].startswith("controller:"), job
        assert _get(r1, "/v1/replica/machines/vm02", hosts)["test_failover"] is not None
        children = [j for j in ctl.ok("GET", "/v1/jobs?kind=failover") if j["plan_run"] == run["id"]]
        assert sorted((j["machine"], j["state"]) for j in children) == [("vm01", "succeeded"),
                                                                          ("vm02", "succeeded")], children
        assert ctl.ok("GET", "/v1/machines/vm01")["fencing_epoch"] == 1       # a test failover fences nothing
    finally:
        for h in hosts:
            h.stop()
        ctl.stop()


def test_reports_move_failover_steps_on(controller):
    """What a host reports of a step (failover.follow, as the report route calls it, on the real store): a
    running step is claimed for that host, a report naming another job is not taken for it, a failed replica
    step gives the machine back at the new epoch, a planned job moves from the primary to the replica, and
    the replica's higher epoch wins."""
    from replicator.controller import desired, failover
    from replicator.controller import models as m

    from .helpers import deployment, ok
    c = controller.client
    hosts = deployment(controller)
    for vm, host in (("vm01", "pa1"), ("vm02", "pa2")):
        ok(c.post("/v1/machines", json={"name": vm, "cloud": "gold", "primary_host": host,
                                        "disks": [f"/vms/{vm}.vhdx"]}), 201)
    one = ok(c.post("/v1/machines/vm01/failover", json={"kind": "unplanned"}), 202)

    def report(host: str, **ops):
        with controller.store.session() as s:
            failover.follow(s, s.get(m.Host, hosts[host]), {vm: {"site": step} for vm, step in ops.items()})

    def step(job, op, state, **more):
        return {"job": job["id"], "op": op, "state": state, **more}
    report("rb1", vm01=step({"id": one["id"] + 100}, "failover", "running"))          # not this job
    assert ok(c.get(f"/v1/jobs/{one['id']}"))["state"] == "queued"
    report("pa1", vm01=step(one, "failover", "running"))                              # not its host
    assert ok(c.get(f"/v1/jobs/{one['id']}"))["state"] == "queued"
    report("rb1", vm01=step(one, "failover", "running"))
    job = ok(c.get(f"/v1/jobs/{one['id']}"))
    assert (job["state"], job["claimed_by"]) == ("running", "host:rb1") and job["lease_expires_at"], job
    report("rb1", vm01=step(one, "failover", "failed", error="vm01: no recovery point 7"))
    job = ok(c.get(f"/v1/jobs/{one['id']}"))
    assert job["state"] == "failed" and "no recovery point 7" in job["message"] \
        and "stays with pa1 at epoch 2" in job["message"], job
    vm01 = ok(c.get("/v1/machines/vm01"))
    assert (vm01["owner_site"], vm01["fencing_epoch"]) == ("a", 2)

    two = ok(c.post("/v1/machines/vm02/failover", json={"kind": "planned"}), 202)
    assert two["host"] == hosts["pa2"] and two["params"]["op"] == "planned-failover"
    report("pa2", vm02=step(two, "planned-failover", "succeeded", host_job="planned-failover-1"))
    job = ok(c.get(f"/v1/jobs/{two['id']}"))
    assert (job["state"], job["host"], job["params"]["op"], job["params"]["planned"]) == (
        "running", hosts["rb1"], "failover", True), job
    with controller.store.session() as s:
        ops = desired.render(s, s.get(m.Host, hosts["rb1"]))["operations"]
    assert ops["vm02"]["site"] == {"job": two["id"], "op": "failover", "planned": True, "point": None}, ops
    report("rb1", vm02=step(two, "failover", "succeeded", point=4, epoch=5))
    job = ok(c.get(f"/v1/jobs/{two['id']}"))
    vm02 = ok(c.get("/v1/machines/vm02"))
    assert job["state"] == "succeeded" and (vm02["owner_site"], vm02["fencing_epoch"]) == ("b", 5), (job, vm02)


def test_the_plan_worker_runs_script_actions_and_stops_on_a_failure_or_a_cancel(controller, tmp_path):
    """Groups of actions only (no hosts needed): a script that succeeds, one that fails (the run fails,
    later groups are not started), and a run cancelled while it waits on a manual action."""
    import sys

    from replicator.controller.plans_worker import PlanWorker

    from .helpers import deployment, ok
    c = controller.client
    deployment(controller)
    marks = [tmp_path / f"group{i}" for i in (1, 2, 3)]
    script = [{"script": [sys.executable, "-c", f"open({str(p)!r}, 'w').write('ran')"]} for p in marks]
    ok(c.post("/v1/plans", json={"name": "scripts", "pair": "gold-silver", "groups": [
        {"pre": [script[0]]},
        {"post": [script[1], {"script": [sys.executable, "-c", "import sys; sys.exit('the check failed')"]}]},
        {"pre": [script[2]]}]}), 201)
    ok(c.post("/v1/plans", json={"name": "manual", "pair": "gold-silver", "groups": [
        {"pre": [{"manual": "call the DBA", "kinds": ["planned"]}, {"manual": "call the network team"}]}]}), 201)
    worker = PlanWorker(controller.store, poll=0.05).start()
    try:
        run = ok(c.post("/v1/plans/scripts/runs", json={"kind": "test"}), 202)
        deadline = time.time() + 30
        while ok(c.get(f"/v1/plan-runs/{run['id']}"))["state"] not in ("failed", "succeeded") \
                and time.time() < deadline:
            time.sleep(0.1)
        done = ok(c.get(f"/v1/plan-runs/{run['id']}"))
        job = ok(c.get(f"/v1/jobs/{done['job']}"))
        assert done["state"] == "failed" and done["current_group"] == 2, done
        assert "exited with 1: the check failed" in job["message"] and job["state"] == "failed", job
        assert [p.exists() for p in marks] == [True, True, False]

        run = ok(c.post("/v1/plans/manual/runs", json={"kind": "test"}), 202)
        deadline = time.time() + 30
        while ok(c.get(f"/v1/plan-runs/{run['id']}"))["state"] != "waiting_for_input" and time.time() < deadline:
            time.sleep(0.1)
        waiting = ok(c.get(f"/v1/plan-runs/{run['id']}"))
        job = ok(c.get(f"/v1/jobs/{waiting['job']}"))
        assert "call the network team" in job["log"][-1]["line"], job["log"]     # the planned-only one skipped
        ok(c.post(f"/v1/jobs/{waiting['job']}/cancel"))
        while ok(c.get(f"/v1/plan-runs/{run['id']}"))["state"] == "waiting_for_input" and time.time() < deadline:
            time.sleep(0.1)
        assert ok(c.get(f"/v1/plan-runs/{run['id']}"))["state"] == "cancelled"
        assert ok(c.get(f"/v1/jobs/{waiting['job']}"))["state"] == "cancelled"
    finally:
        worker.stop()


def test_a_plan_run_left_by_a_stopped_worker_is_taken_over_where_it_was(controller, tmp_path):
    """Worker 1 stops while the run waits at group 2's manual action; once its lease lapsed, worker 2 takes the
    run on from group 2 (group 1's script is not run again), and the confirmation ends it."""
    import datetime as dt
    import sys

    from replicator.controller.plans_worker import PlanWorker

    from .helpers import deployment, ok
    c = controller.client
    deployment(controller)
    mark = tmp_path / "group1.log"
    ok(c.post("/v1/plans", json={"name": "p", "pair": "gold-silver", "groups": [
        {"pre": [{"script": [sys.executable, "-c", f"open({str(mark)!r}, 'a').write('ran\\n')"]}]},
        {"pre": [{"manual": "open the firewall"}]}]}), 201)
    lease = dt.timedelta(seconds=1)

    def state(run_id: int) -> dict:
        deadline = time.time() + 30
        while time.time() < deadline:
            r = ok(c.get(f"/v1/plan-runs/{run_id}"))
            if r["state"] == "waiting_for_input":
                return r
            time.sleep(0.1)
        raise AssertionError(r)
    first = PlanWorker(controller.store, poll=0.05, lease=lease).start()
    run = ok(c.post("/v1/plans/p/runs", json={"kind": "test"}), 202)
    waiting = state(run["id"])
    first.stop()
    second = PlanWorker(controller.store, poll=0.05, lease=lease).start()
    try:
        deadline = time.time() + 30
        while ok(c.get(f"/v1/jobs/{waiting['job']}"))["claimed_by"] != second.name and time.time() < deadline:
            time.sleep(0.1)
        waiting = state(run["id"])
        assert waiting["current_group"] == 2 and mark.read_text() == "ran\n", waiting
        ok(c.post(f"/v1/plan-runs/{run['id']}/confirm", json={"action_id": waiting["waiting_action_id"]}))
        while ok(c.get(f"/v1/plan-runs/{run['id']}"))["state"] != "succeeded" and time.time() < deadline:
            time.sleep(0.1)
        job = ok(c.get(f"/v1/jobs/{waiting['job']}"))
        assert job["state"] == "succeeded" and job["claimed_by"] == second.name, job
        assert any("resumed at group 2" in line["line"] for line in job["log"]), job["log"]
        assert mark.read_text() == "ran\n"
    finally:
        second.stop()

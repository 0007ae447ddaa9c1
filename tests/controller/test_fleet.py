"""The fleet story of issue 14: three replicatord processes on loopback (two primaries, one replica host)
registered to one `replicator-controller` with keys; sites, clouds, a pair, a policy and a storage mapping made
only through the REST API; machines enabled through it replicate without anyone touching a host's files --
the replica's point is byte-identical to the primary's disk at the cut; the policy's new frequency reaches
the hosts; pause, resume and resync asked of the controller are run by the host; with the controller stopped
the hosts replicate on, and once it is back it shows what happened."""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from replicator.replica import ReplicaStore
from replicator.vhdx import create_vhdx

from ..daemon.two_sites import Site, read_vhdx, same
from .conftest import free_port
from .test_host_channel import ControllerProc

MiB = 1 << 20
BIN = os.path.dirname(sys.executable)


class FleetHost:
    """One host's replicatord, run from the controller: nothing on the host but its key file and disks."""

    def __init__(self, folder, name: str, ctl: ControllerProc, key: str):
        self.dir, self.name, self.ctl, self.key = folder / name, name, ctl, key
        self.dir.mkdir()
        self.state = self.dir / "state"
        self.admin, self.data = free_port(), free_port()
        self.proc = None

    def start(self) -> None:
        self.log = open(self.dir / "daemon.log", "ab")
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "replicatord"), "--register", self.ctl.url, "--key", self.key, "--state",
             str(self.state), "--hostname", self.name, "--admin-listen", f"127.0.0.1:{self.admin}", "--data-url",
             f"https://127.0.0.1:{self.data}", "--poll", "0.5"], stdout=self.log, stderr=subprocess.STDOUT)

    stop = ControllerProc.stop

    def text(self) -> str:
        return (self.dir / "daemon.log").read_text(errors="replace")

    def api(self, method: str, path: str) -> dict:
        token = (self.state / "admin.token").read_text().strip()
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin}{path}", method=method,
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def machine(self, name: str) -> dict:
        return next(m for m in self.api("GET", "/v1/status")["machines"] if m["name"] == name)

    # a guest's writes over NBD, and the disk as the daemon left it at the cut (STATE is DIR/state, as there)
    qemu_io = Site.qemu_io
    disk_bytes = Site.disk_bytes


def wait(predicate, what: str, hosts, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for h in hosts:
            assert h.proc is None or h.proc.poll() is None, f"{h.name} exited:\n{h.text()}"
        try:
            if predicate():
                return
        except (OSError, KeyError, StopIteration, TypeError, ValueError, urllib.error.URLError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}:\n" + "\n".join(f"--- {h.name}\n{h.text()[-3000:]}"
                                                                        for h in hosts))


def replica_bytes(root, disk_id: str) -> bytes:
    return read_vhdx(ReplicaStore(str(root)).disk(disk_id).image_path)


def test_fleet_replicates_from_the_controller_and_outlives_it(tmp_path, database_url_pg):
    ctl = ControllerProc(tmp_path, database_url_pg, cert_lifetime=3600).start()
    hosts: list[FleetHost] = []
    try:
        _fleet(tmp_path, ctl, hosts)
    finally:
        for h in hosts:
            h.stop()
        ctl.stop()


def _fleet(tmp_path, ctl: ControllerProc, hosts: list) -> None:
    for site in ("east", "west"):
        ctl.ok("POST", "/v1/sites", {"name": site})
    p1, p2 = (FleetHost(tmp_path, n, ctl, ctl.key_file(tmp_path, "east")) for n in ("p1", "p2"))
    r1 = FleetHost(tmp_path, "r1", ctl, ctl.key_file(tmp_path, "west"))
    hosts += [p1, p2, r1]
    disks = {}
    for k, h in enumerate((p1, p2)):                 # each primary's guest disk, written before protection
        (h.dir / "disks").mkdir()
        disks[h.name] = h.dir / "disks" / f"{h.name}-os.vhdx"
        with create_vhdx(str(disks[h.name]), 16 * MiB, block_size=MiB) as d:
            d.write(0, bytes([0x50 + k]) * MiB)
            d.write(8 * MiB, os.urandom(2 * MiB))
    for h in hosts:
        h.start()
    wait(lambda: len(ctl.ok("GET", "/v1/hosts")) == 3, "three hosts registered", hosts)
    for h in hosts:                                    # running idle: nothing desired yet
        wait(lambda h=h: h.api("GET", "/v1/status")["controller"]["state"] == "connected", f"{h.name} up", hosts)

    # everything from here is the REST API
    ctl.ok("POST", "/v1/clouds", {"name": "gold", "site": "east"})
    ctl.ok("POST", "/v1/clouds", {"name": "gold-dr", "site": "west"})
    for h, cloud in ((p1, "gold"), (p2, "gold"), (r1, "gold-dr")):
        ctl.ok("PUT", f"/v1/hosts/{h.name}/cloud", {"cloud": cloud})
    ctl.ok("POST", "/v1/policies", {"name": "fast", "frequency": "15m", "additional_points": 1})
    ctl.ok("POST", "/v1/pairs", {"name": "gold-pair", "primary": "gold", "recovery": "gold-dr", "policy": "fast"})
    store = tmp_path / "r1" / "replica-store"
    ctl.ok("POST", "/v1/pairs/gold-pair/storage-mappings", {"source": str(tmp_path), "target": str(store)})
    for h, vm in ((p1, "vm01"), (p2, "vm02")):
        ctl.ok("POST", "/v1/machines", {"name": vm, "cloud": "gold", "primary_host": h.name,
                                        "disks": [str(disks[h.name])]})
    for h, vm in ((p1, "vm01"), (p2, "vm02")):
        wait(lambda h=h, vm=vm: h.machine(vm)["state"] == "Replicating"
             and h.machine(vm)["stats"]["successful_cycles"] >= 1, f"{vm} replicating on {h.name}", hosts, 90)

    # a guest writes; a cycle; the replica's point equals the disk at the cut
    def cycle_and_compare(h, vm, pattern: int, at: str) -> None:
        h.qemu_io(vm, disks[h.name].name, f"write -P {pattern} {at} 1M")
        done = h.api("POST", f"/v1/machines/{vm}/cycle?wait=1")
        assert done["state"] == "Replicating", done
        disk_id = h.machine(vm)["disks"][disks[h.name].name]["disk_id"]
        same(replica_bytes(store, disk_id), h.disk_bytes(disks[h.name]), f"{vm}'s replica")

    cycle_and_compare(p1, "vm01", 0x61, "2M")
    cycle_and_compare(p2, "vm02", 0x62, "5M")
    for h, vm in ((p1, "vm01"), (p2, "vm02")):
        assert h.machine(vm)["stats"]["rpo_target"] == 900
    assert not (p1.state / "replicatord.toml").exists() and json.loads(
        (p1.state / "controller" / "desired.json").read_text())["config"]["machine"][0]["name"] == "vm01"
    enable_jobs = [j for j in ctl.ok("GET", "/v1/jobs") if j["kind"] == "enable-protection"]
    assert len(enable_jobs) == 2 and all(j["state"] == "succeeded" for j in enable_jobs), enable_jobs

    # the policy's frequency changes on the controller: both primaries run it
    policy = ctl.ok("GET", "/v1/policies/fast")
    body = {k: policy[k] for k in ("name", "frequency", "additional_points")} | {"frequency": "5m"}
    ctl.ok("PUT", "/v1/policies/fast", body)
    for h, vm in ((p1, "vm01"), (p2, "vm02")):
        wait(lambda h=h, vm=vm: h.machine(vm)["stats"]["rpo_target"] == 300, f"{vm} at 5 minutes", hosts)

    # pause, resume and resync asked of the controller are run by the host, and their jobs finish
    ctl.ok("POST", "/v1/machines/vm02/pause")
    wait(lambda: p2.machine("vm02")["state"] == "Suspended", "vm02 paused by the controller", hosts)
    ctl.ok("POST", "/v1/machines/vm02/resume")
    wait(lambda: p2.machine("vm02")["state"] == "Replicating", "vm02 resumed", hosts)
    ctl.ok("POST", "/v1/machines/vm02/resync")
    wait(lambda: any(j["kind"] == "resync" and j["subject"] == "vm02" and j["state"] == "succeeded"
                     for j in p2.api("GET", "/v1/jobs")["jobs"]), "vm02's resync on p2", hosts)
    wait(lambda: {j["kind"]: j["state"] for j in ctl.ok("GET", "/v1/jobs") if j["kind"] != "enable-protection"}
         == {"pause-protection": "succeeded", "resume-protection": "succeeded", "resync": "succeeded"},
         "the controller's jobs done", hosts)
    resync = next(j for j in ctl.ok("GET", "/v1/jobs") if j["kind"] == "resync")   # it followed the host's job
    followed = resync["message"].rpartition("(")[2].rstrip(")")
    host_job = p2.api("GET", f"/v1/jobs/{followed}")
    assert resync["progress"] == 100 and "resync succeeded" in resync["message"], resync
    assert host_job["kind"] == "resync" and host_job["subject"] == "vm02" and host_job["state"] == "succeeded"
    cycle_and_compare(p2, "vm02", 0x64, "13M")
    # each host's fencing table comes from the controller (daemon/fencing.py reads it)
    fenced = {h.name: json.loads((h.state / "controller" / "fencing.json").read_text())["machines"] for h in hosts}
    assert fenced == {"p1": {"vm01": {"epoch": 1, "role": "primary"}},
                      "p2": {"vm02": {"epoch": 1, "role": "primary"}},
                      "r1": {"vm01": {"epoch": 1, "role": "replica"}, "vm02": {"epoch": 1, "role": "replica"}}}
    # disabled on the controller: p2 stops protecting vm02 (its export ends, the disk is the guest's again)
    ctl.ok("POST", "/v1/machines/vm02/disable")
    wait(lambda: [m["name"] for m in p2.api("GET", "/v1/status")["machines"]] == [], "vm02 no longer protected",
         hosts)
    wait(lambda: [j["state"] for j in ctl.ok("GET", "/v1/jobs") if j["kind"] == "disable-protection"]
         == ["succeeded"], "the disable job done", hosts)

    # the controller goes away: the hosts say so and replicate on
    ctl.stop()
    wait(lambda: all(h.api("GET", "/v1/status")["controller"]["state"].startswith("unreachable since")
                     for h in hosts), "the hosts to see the controller gone", hosts)
    offline_cycles = p1.machine("vm01")["stats"]["successful_cycles"] + 1
    cycle_and_compare(p1, "vm01", 0x63, "11M")
    assert p1.machine("vm01")["stats"]["successful_cycles"] == offline_cycles
    last_offline = p1.machine("vm01")["stats"]["last_replication_time"]

    # back: the reports of what happened meanwhile reach it
    ctl.start()
    wait(lambda: dt.datetime.fromisoformat(ctl.ok("GET", "/v1/machines/vm01")["last_success_at"]).timestamp()
         >= last_offline - 0.001, "the controller to learn of the offline cycle", hosts)
    vm01 = ctl.ok("GET", "/v1/machines/vm01")
    assert vm01["observed_state"] == "Replicating" and vm01["health"] in ("Normal", "Warning"), vm01
    for h in hosts:
        wait(lambda h=h: h.api("GET", "/v1/status")["controller"]["state"] == "connected", f"{h.name} back", hosts)
    assert "unreachable" in p1.text() and "reachable again" in p1.text()
    code, body = ctl.api("DELETE", "/v1/hosts/p1")                    # it runs vm01: not forgotten
    assert code == 409 and "1 machine(s) placed on it" in body["error"], body
    report = ctl.ok("GET", "/v1/hosts/p1/report")                  # what p1 says of the time it was cut off
    away = report["status"]["controller"]["last_unreachable"]
    vm01 = next(x for x in report["status"]["machines"] if x["name"] == "vm01")
    assert vm01["stats"]["successful_cycles"] >= offline_cycles
    span = [dt.datetime.fromisoformat(away[k]).timestamp() for k in ("from", "to")]
    assert span[0] - 1 <= last_offline <= span[1] + 1, (away, last_offline)    # (whole seconds)

"""Failback through the controller with real hosts (issue 14): three replicatord processes registered to a real
replicator-controller (SQLite), vm01 replicating from p1 to r1. An unplanned failover to r1 (forced: p1 still
holds its lease), committed; reverse replication through the API (p1 adopts its old disk, r1 replicates back
into it: a checksum resync); the machine writes on r1; a failback through the API: p1's own disk file is byte
for byte r1's disk at the final cut, and replication goes from p1 to r1 again (r1's replica byte-identical to
p1's disk after a new write and cycle). reverse and failback are asked with the `replicator --controller` CLI."""
from __future__ import annotations

import json

from replicator.cli import main as cli

from ..daemon.two_sites import read_vhdx, same
from .test_failover import _cycle, _get, _job_done, _settled, _setup
from .test_fleet import FleetHost, replica_bytes, wait
from .test_host_channel import ControllerProc


def test_reverse_replication_and_failback_through_the_controller(tmp_path, capsys):
    ctl = ControllerProc(tmp_path, cert_lifetime=3600).start()

    def run(*argv, code=0) -> str:
        capsys.readouterr()
        got = cli(["--controller", ctl.url, "--token", str(ctl.data / "admin.token"), "--ca", ctl.ca_path, *argv])
        out, err = capsys.readouterr()
        assert got == code, (argv, out, err)
        return out if code == 0 else err
    hosts: list[FleetHost] = []
    try:
        f = _setup(tmp_path, ctl, hosts)
        p1, r1, disk = f["p1"], f["r1"], f["disks"]["p1"]
        name = disk.name

        # an unplanned failover (p1 is alive: forced), committed
        _job_done(ctl, ctl.ok("POST", "/v1/machines/vm01/failover", {"kind": "unplanned", "force": True})["id"],
                  hosts)
        _job_done(ctl, ctl.ok("POST", "/v1/machines/vm01/commit-failover")["id"], hosts)
        view = _get(r1, "/v1/replica/machines/vm01", hosts)
        assert view["state"] == "FailedOver", view
        (running,) = view["failover"]["paths"].values()
        (disk_id,) = view["failover"]["paths"]
        err = run("machine", "failback", "vm01", code=2)         # a refusal of the controller: one line
        assert err.count("\n") == 1 and "needs reverse replication running" in err, err

        # the machine writes on r1; reverse replication through the controller
        _settled(r1, hosts)
        r1.qemu_io("vm01", name, "write -P 0x81 3M 256k")
        rev = _job_done(ctl, json.loads(run("machine", "reverse", "vm01"))["id"], hosts, 90)
        assert "replicates back to p1" in rev["message"], rev
        assert ctl.ok("GET", "/v1/machines/vm01")["direction"] == "reversed"
        wait(lambda: r1.machine("vm01")["last_cycle"], "r1's first cycle back to p1", hosts, 90)
        back = r1.machine("vm01")
        assert back["state"] == "Replicating" and back["target"].endswith(str(p1.data)), back
        assert back["last_cycle"]["kinds"] == ["resync"], back["last_cycle"]      # only differences travel
        assert all(x["name"] != "vm01" for x in _get(p1, "/v1/status", hosts)["machines"])   # p1 only receives
        assert _get(p1, "/v1/replica/machines/vm01", hosts)["role"] == "replica"

        # more writes on r1 after the reverse: the failback's final cycle carries them
        r1.qemu_io("vm01", name, "write -P 0x82 6M 64k")
        fb = json.loads(run("machine", "failback", "vm01"))
        assert fb["params"]["epoch_from"] == 2 and fb["params"]["epoch_to"] == 3, fb
        done = _job_done(ctl, fb["id"], hosts, 120)
        assert "runs on p1 again" in done["message"], done
        final = read_vhdx(running)                       # r1's disk as the final cut left it (no longer served)
        assert final[6 << 20:(6 << 20) + 1024] == b"\x82" * 1024
        same(p1.disk_bytes(disk), final, "p1's own disk after the failback")
        vm01 = ctl.ok("GET", "/v1/machines/vm01")
        assert vm01["direction"] == "forward" and vm01["owner_site"] == "east" and vm01["fencing_epoch"] >= 3, vm01

        # replication from p1 to r1 resumes: a write on p1, a cycle, r1's replica holds it
        _settled(p1, hosts)
        wait(lambda: p1.machine("vm01")["state"] == "Replicating", "p1 protecting vm01 again", hosts, 90)
        p1.qemu_io("vm01", name, "write -P 0x91 1M 128k")
        code, answer = _cycle(p1, "vm01")
        assert code == 200, answer
        assert p1.machine("vm01")["epoch"] == vm01["fencing_epoch"] and not p1.machine("vm01")["fenced"]
        m = _get(r1, "/v1/replica/machines/vm01", hosts)
        assert m["role"] == "replica" and not m["reversed"], m
        same(replica_bytes(tmp_path / "r1" / "replica-store", disk_id), p1.disk_bytes(disk), "r1's replica")
    finally:
        for h in hosts:
            h.stop()
        ctl.stop()

"""Fencing between two replicatord sites on loopback (mutual TLS), as a controller's agent would leave
them: site A protects vm01 and vm02 at epoch 3 (its fencing table), site B holds their replicas. B fails
vm01 over (unplanned): A's next cycle of vm01 is refused as stale, A says why in one line and sends
nothing more for vm01, while vm02 goes on. B cancels; once A's table gives vm01 the failover's epoch (a
reload), vm01 replicates again."""
from __future__ import annotations

import json
from pathlib import Path

from replicator.daemon import fencing
from replicator.orchestration import states

from ..daemon.two_sites import same, two_sites

DISKS = {"vm01": [("a0.vhdx", 16), ("a1.vhdx", 8)], "vm02": [("b0.vhdx", 8)]}
LINE = ("fenced: the replica site failed this machine over at epoch 4; this host's epoch is 3: no cycles until "
        "the epoch is raised or `replicator machine vm01 resume`")


def replica_epochs(b, a, name: str) -> set:
    disks = a.machine(name)["disks"].values()
    return {json.loads((b.dir / "replica" / "disks" / d["disk_id"] / "state.json").read_text())["epoch"]
            for d in disks}


def test_failover_fences_the_old_primary_and_a_raised_epoch_resumes_it(tmp_path):
    a, b = two_sites(tmp_path, DISKS)
    fencing.save(str(a.dir / "state"), {"vm01": fencing.Entry(3, "primary"), "vm02": fencing.Entry(3, "primary")})
    b.start(ready=())
    try:
        a.start()
        a.qemu_io("vm01", "a0.vhdx", "write -P 0x31 1M 64k")
        a.cli("machine", "vm01", "cycle")
        assert replica_epochs(b, a, "vm01") == {3} and a.machine("vm01")["epoch"] == 3

        b.cli("replica-machine", "vm01", "failover")
        assert b.replica_machine("vm01")["state"] == "FailedOverWaitingCompletion"
        assert replica_epochs(b, a, "vm01") == {4}

        # the old primary's next cycle is refused as stale: one line, and the machine stops
        a.qemu_io("vm01", "a0.vhdx", "write -P 0x32 2M 64k")
        refused = a.cli("machine", "vm01", "cycle", check=False)
        out = refused.stdout + refused.stderr
        assert refused.returncode != 0 and "fenced: the replica site failed machine vm01 over at epoch 4" in out
        assert len(out.strip().splitlines()) == 1, out
        m = a.machine("vm01")
        assert m["state"] == "Error" and m["reason"] == LINE and m["fenced"]["replica_epoch"] == 4
        counters = b.status()["replica"]["counters"]
        assert counters["rejected_fenced"] >= 1

        # nothing more is sent for vm01: an operator's cycle is refused here, with the same line
        again = a.cli("machine", "vm01", "cycle", check=False)
        assert again.returncode != 0 and LINE in again.stdout + again.stderr
        after = b.status()["replica"]["counters"]
        assert (after["requests"], after["rejected_fenced"]) == (counters["requests"], counters["rejected_fenced"])

        # the host's other machine goes on
        a.qemu_io("vm02", "b0.vhdx", "write -P 0x41 1M 64k")
        a.cli("machine", "vm02", "cycle")
        vm02 = a.machine("vm02")
        assert vm02["state"] == "Replicating" and vm02["fenced"] is None
        same(b.replica_bytes(vm02["disks"]["b0.vhdx"]["disk_id"]), a.disk_bytes(a.dir / "b0.vhdx"), "vm02")

        # B cancels the failover (its epoch stays 4); the controller hands A epoch 4: a reload resumes vm01
        b.cli("replica-machine", "vm01", "cancel-failover")
        assert a.machine("vm01")["fenced"] is not None         # nothing changes at A by itself
        fencing.update(str(a.dir / "state"), {"vm01": {"epoch": 4, "role": "primary"},
                                              "vm02": {"epoch": 3, "role": "primary"}})
        code, answer = a.api("POST", "/v1/reload")
        assert code == 200, answer
        a.wait(lambda: a.machine("vm01")["epoch"] == 4, "the reload")
        m = a.machine("vm01")
        # the history, not `reason`: the unfenced machine may already have run a cycle that says so instead
        saved = json.loads(Path(states.state_path(str(a.dir / "state"), "vm01")).read_text())
        lifted = [h for h in saved["history"] if h["event"] == "unfenced"]
        assert m["fenced"] is None and len(lifted) == 1 and "raised to 4 (fenced at 3)" in lifted[0]["reason"], m
        a.cli("machine", "vm01", "cycle")
        m = a.machine("vm01")
        assert m["state"] == "Replicating", m
        for name, d in m["disks"].items():
            same(b.replica_bytes(d["disk_id"]), a.disk_bytes(a.dir / name), f"replica of {name} at epoch 4")
        assert replica_epochs(b, a, "vm01") == {4}
    finally:
        a.stop()
        b.stop()

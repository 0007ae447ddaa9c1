"""Recovery plans on the replica site's daemon: groups in order, a script and a manual action confirmed
through the CLI, a failing script stopping the plan before its later groups, then an unplanned failover of
the whole plan -- each member's disks compared byte for byte with the primary's."""
from __future__ import annotations

import os
import subprocess
import time

from .two_sites import BIN, read_vhdx, same, two_sites

MACHINES = {"vm01": [("d0.vhdx", 16)], "vm02": [("d1.vhdx", 16)]}


def plans(folder) -> str:
    ran = folder / "plan-ran.txt"
    return f'''
[[plan]]
name = "dr"

[[plan.group]]
members = ["vm01"]
post = [{{ script = ["sh", "-c", "echo $REPLICATOR_PLAN $REPLICATOR_FAILOVER >> {ran}"] }},
        {{ manual = "Check that vm01 answers", kinds = ["test"] }}]

[[plan.group]]
members = ["vm02"]

[[plan]]
name = "broken"

[[plan.group]]
members = ["vm01"]
post = [{{ script = ["sh", "-c", "echo the application check failed; exit 3"] }}]

[[plan.group]]
members = ["vm02"]
pre = [{{ script = ["touch", "{folder / 'group2-ran'}"] }}]
'''


def run_plan(site, name: str, kind: str) -> subprocess.Popen:
    return subprocess.Popen([os.path.join(BIN, "replicator"), "plan", name, kind, "--wait", "--config", site.config],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_recovery_plans(tmp_path):
    a, b = two_sites(tmp_path, MACHINES, extra_b=plans(tmp_path))
    b.start(ready=())
    a.start()
    try:
        a.qemu_io("vm01", "d0.vhdx", "write -P 0x51 2M 1M")
        a.qemu_io("vm02", "d1.vhdx", "write -P 0x52 5M 64k")
        snaps = {}
        for m, disk in (("vm01", "d0.vhdx"), ("vm02", "d1.vhdx")):
            a.cli("machine", m, "cycle")
            snaps[m] = a.disk_bytes(a.dir / disk)

        # a test failover of the plan: group 1, its script, then it waits for the operator's confirmation
        follow = run_plan(b, "dr", "test")
        b.wait(lambda: (b.api("GET", "/v1/plans/dr")[1]["run"] or {}).get("pending"), "the manual action",
               timeout=30)
        run = b.api("GET", "/v1/plans/dr")[1]["run"]
        assert run["pending"] == [{"id": "g1.post2", "text": "Check that vm01 answers"}]
        assert run["members"] == {"vm01": "ok", "vm02": "not started"}
        assert b.replica_machine("vm02")["test_failover"] is None       # group 2 waits for group 1
        b.cli("plan", "dr", "confirm", "g1.post2")
        out, _ = follow.communicate(timeout=60)
        assert follow.returncode == 0, out
        assert "g1.post2: ok: confirmed by operator" in out and "dr: test failover succeeded" in out
        for m, disk in (("vm01", "d0.vhdx"), ("vm02", "d1.vhdx")):
            same(read_vhdx(b.dir / "test-failover" / m / disk), snaps[m], f"test failover of {m}")
        assert (tmp_path / "plan-ran.txt").read_text() == "dr test\n"
        job = b.api("GET", f"/v1/jobs/{run['job']}")[1]
        assert job["state"] == "succeeded" and any("group 2: done" in e["text"] for e in job["log"])
        b.cli("plan", "dr", "cleanup")
        assert all(b.replica_machine(m)["test_failover"] is None for m in MACHINES)

        # a failing post-script stops the plan: group 2 never starts
        follow = run_plan(b, "broken", "test")
        out, _ = follow.communicate(timeout=60)
        assert follow.returncode == 1, out
        assert "post-action g1.post1 failed: exited with 3: the application check failed" in out
        run = b.api("GET", "/v1/plans/broken")[1]["run"]
        assert run["state"] == "failed" and run["failed_group"] == 1
        assert run["members"] == {"vm01": "ok", "vm02": "not started"}
        assert b.replica_machine("vm02")["test_failover"] is None and not (tmp_path / "group2-ran").exists()
        b.cli("replica-machine", "vm01", "cleanup-test-failover")
        p = b.cli("plan", "broken", "confirm", "g1.post1", check=False)
        assert p.returncode != 0 and "is not running" in p.stderr

        # an unplanned failover of the whole plan (its manual action is for tests only)
        a.qemu_io("vm02", "d1.vhdx", "write -P 0x53 9M 64k")       # after the last cycle: lost
        started = time.time()
        follow = run_plan(b, "dr", "unplanned")
        out, _ = follow.communicate(timeout=60)
        assert follow.returncode == 0, out
        assert time.time() - started < 30
        for m, disk in (("vm01", "d0.vhdx"), ("vm02", "d1.vhdx")):
            assert b.replica_machine(m)["state"] == "FailedOverWaitingCompletion"
            same(b.disk_bytes(b.dir / "failover" / m / disk), snaps[m], f"failover of {m}")
        assert (tmp_path / "plan-ran.txt").read_text() == "dr test\ndr unplanned\n"
        listing = b.cli("plans").stdout
        assert "dr: 2 groups; last run: unplanned succeeded" in listing and "broken: 2 groups; last run: test failed" \
            in listing
    finally:
        a.stop()
        b.stop()

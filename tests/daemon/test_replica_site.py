"""The replica site's operations between two replicatord sites on loopback (mutual TLS): test failover at
a chosen point and its cleanup, unplanned failover at the latest point and its cancellation, planned
failover with zero loss, reverse replication sending only what changed, failback -- every one ending with
the disks compared byte for byte -- and the refusals of bad requests."""
from __future__ import annotations

import json
import os
import subprocess

from .two_sites import MiB, read_vhdx, same, two_sites

DISKS = {"vm01": [("d0.vhdx", 32), ("d1.vhdx", 16)]}
NAMES = ("d0.vhdx", "d1.vhdx")
HOUR = 3600


def cycle_and_snapshot(a) -> dict[str, bytes]:
    """An operator's cycle on site A; then its disks as they were at the cut."""
    a.cli("machine", "vm01", "cycle")
    return {n: a.disk_bytes(a.dir / n) for n in NAMES}


def test_test_failover_at_a_chosen_point_and_unplanned_failover(tmp_path):
    a, b = two_sites(tmp_path, DISKS)
    b.start(ready=())
    try:
        snaps = {}
        for shift, pattern in ((2 * HOUR, 0x11), (HOUR, 0x12), (0, 0x13)):   # points in three hours
            a.start(clock_shift=shift)
            a.qemu_io("vm01", "d0.vhdx", f"write -P {pattern} {pattern - 0x10}M 1M", "write -z 20M 64k")
            a.qemu_io("vm01", "d1.vhdx", f"write -P {pattern} {pattern & 7}M 64k")
            snaps[pattern] = cycle_and_snapshot(a)
            if shift:
                a.stop()
        m = b.replica_machine("vm01")
        assert [d["name"] for d in m["disks"]] == list(NAMES) and m["role"] == "replica"
        assert m["state"] == "Replicating" and len(m["points"]) == 3, m["points"]
        assert len({int(p["time"] // HOUR) for p in m["points"]}) == 3
        middle = m["points"][1]["point"]
        assert all(len(set(p["generations"].values())) == 1 for p in m["points"])

        # test failover at the middle point: the disks as site A had them at that cut
        out = b.cli("replica-machine", "vm01", "test-failover", "--point", str(middle)).stdout
        assert f"test failover of point {middle}" in out
        for n in NAMES:
            same(read_vhdx(b.dir / "test-failover" / "vm01" / n), snaps[0x12][n], f"test failover of {n}")
        code, err = b.api("POST", "/v1/replica/machines/vm01/failover", {})
        assert code == 409 and "test failover is running" in err["error"]
        # the test VM reads and writes its disks over NBD (qemu cannot open VHDX differencing disks)
        uris = b.replica_machine("vm01")["test_nbd"]
        assert set(uris) == set(NAMES)
        served = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uris["d1.vhdx"],
                                 str(tmp_path / "served.raw")], capture_output=True, text=True, timeout=60)
        assert served.returncode == 0, served.stderr
        same((tmp_path / "served.raw").read_bytes(), snaps[0x12]["d1.vhdx"], "test disk over NBD")
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64k", uris["d1.vhdx"]], check=True,
                       capture_output=True, timeout=60)
        # replication goes on meanwhile, into the replica and not into the test disks
        a.qemu_io("vm01", "d0.vhdx", "write -P 0x14 5M 2M")
        latest = cycle_and_snapshot(a)
        for d in b.replica_machine("vm01")["disks"]:
            same(b.replica_bytes(d["disk_id"]), latest[d["name"]], f"replica of {d['name']} during the test")
        same(read_vhdx(b.dir / "test-failover" / "vm01" / "d0.vhdx"), snaps[0x12]["d0.vhdx"], "test disk")
        b.cli("replica-machine", "vm01", "cleanup-test-failover")
        m = b.replica_machine("vm01")
        assert m["test_failover"] is None and not os.path.exists(b.dir / "test-failover" / "vm01")

        # unplanned failover at the latest point: what the last cycle shipped, not what came after it
        a.qemu_io("vm01", "d1.vhdx", "write -P 0x15 0 1M")
        b.cli("replica-machine", "vm01", "failover")
        m = b.replica_machine("vm01")
        assert m["state"] == "FailedOverWaitingCompletion" and m["failover"]["kind"] == "unplanned"
        for n in NAMES:
            same(b.disk_bytes(b.dir / "failover" / "vm01" / n), latest[n], f"failed-over {n}")
        # the machine runs on site B: a VM writes to its disk over NBD
        b.qemu_io("vm01", "d1.vhdx", "write -P 0x77 3M 64k")
        b.stop()                                    # a restart brings the failed-over machine back up
        b.start(ready=())
        assert b.replica_machine("vm01")["state"] == "FailedOverWaitingCompletion"
        b.qemu_io("vm01", "d1.vhdx", "write -P 0x78 4M 64k")
        written = b.disk_bytes(b.dir / "failover" / "vm01" / "d1.vhdx")
        assert written[3 * MiB:3 * MiB + 65536] == b"\x77" * 65536
        assert written[4 * MiB:4 * MiB + 65536] == b"\x78" * 65536
        # the former primary's cycles are refused now
        refused = a.cli("machine", "vm01", "cycle", check=False)
        assert refused.returncode != 0 and "failed over" in refused.stdout + refused.stderr

        # cancel: the failed-over disks go, replication from site A resumes
        b.cli("replica-machine", "vm01", "cancel-failover")
        m = b.replica_machine("vm01")
        assert m["state"] == "Replicating" and not any(d["failed_over"] for d in m["disks"])
        assert not os.path.exists(b.dir / "failover" / "vm01" / "d0.vhdx")
        now = cycle_and_snapshot(a)
        for d in m["disks"]:
            same(b.replica_bytes(d["disk_id"]), now[d["name"]], f"replica of {d['name']} after the cancel")
    finally:
        a.stop()
        b.stop()


def test_bad_requests_are_refused_with_their_reason(tmp_path):
    a, b = two_sites(tmp_path, {"vm01": [("d0.vhdx", 16)]})
    b.start(ready=())
    a.start()
    try:
        for method, path, body, code, text in (
                ("GET", "/v1/replica/machines/nope", None, 404, "holds no machine 'nope'"),
                ("POST", "/v1/replica/machines/nope/failover", {}, 404, "holds no machine 'nope'"),
                ("POST", "/v1/replica/machines/vm01/explode", {}, 404, "unknown operation 'explode'"),
                ("POST", "/v1/replica/machines/vm01/failover", {"point": 999999}, 404, "no recovery point 999999"),
                ("POST", "/v1/replica/machines/vm01/failover", {"point": "x"}, 409, "point must be an integer"),
                ("POST", "/v1/replica/machines/vm01/failover", {"planned": True}, 409,
                 "has not reported PreparedForFailover"),
                ("POST", "/v1/replica/machines/vm01/reverse", {}, 409, "needs a failed-over machine"),
                ("POST", "/v1/replica/machines/vm01/commit-failover", {}, 409, "commit_failover is not allowed"),
                ("POST", "/v1/replica/machines/vm01/cleanup-test-failover", {}, 409, "no test failover"),
                ("GET", "/v1/plans/nope", None, 404, "no recovery plan 'nope'"),
                ("POST", "/v1/plans/nope/test", {}, 404, "no recovery plan 'nope'")):
            got, answer = b.api(method, path, body)
            assert (got, text in answer["error"]) == (code, True), (path, got, answer)
        got, answer = a.api("POST", "/v1/replica/machines/vm01/accept-reverse", {})
        assert got == 409 and "is Replicating from this site" in answer["error"]
        # a `from` that is not a principal is refused before anything happens, force or not (the admin
        # fuzzer's case: it was a 500)
        got, answer = a.api("POST", "/v1/replica/machines/vm01/accept-reverse", {"from": [False, "x"], "force": True})
        assert got == 409 and "from must be a principal" in answer["error"], (got, answer)
        assert a.machine("vm01")["state"] == "Replicating"
        for args, text in ((("replica-machine", "nope", "failover"), "holds no machine 'nope'"),
                           (("replica-machine", "vm01", "test-failover", "--point", "424242"), "no recovery point"),
                           (("plan", "nope", "test"), "no recovery plan 'nope'")):
            p = b.cli(*args, check=False)
            assert p.returncode != 0 and text in p.stderr, (args, p.returncode, p.stderr)
        assert b.replica_machine("vm01")["state"] == "Replicating"      # nothing changed
    finally:
        a.stop()
        b.stop()


def test_planned_failover_reverse_replication_and_failback(tmp_path):
    a, b = two_sites(tmp_path, DISKS)
    b.start(ready=())
    a.start()
    try:
        a.qemu_io("vm01", "d0.vhdx", "write -P 0x21 1M 3M")
        a.qemu_io("vm01", "d1.vhdx", "write -P 0x22 4M 1M")
        a.cli("machine", "vm01", "cycle")
        a.qemu_io("vm01", "d0.vhdx", "write -P 0x23 9M 64k")        # shipped only by the final cycle

        # planned failover: the primary stops and ships everything; site B completes it with zero loss
        a.cli("machine", "vm01", "planned-failover")
        assert a.machine("vm01")["state"] == "PreparedForFailover"
        primary = {n: a.disk_bytes(a.dir / n) for n in NAMES}
        b.cli("replica-machine", "vm01", "failover", "--planned")
        assert b.replica_machine("vm01")["state"] == "FailedOverWaitingCompletion"
        for n in NAMES:
            same(b.disk_bytes(b.dir / "failover" / "vm01" / n), primary[n], f"planned failover of {n}")

        # the machine runs on site B and writes; reverse replication: site A adopts its old disks ...
        b.qemu_io("vm01", "d0.vhdx", "write -P 0x31 12M 192k")
        b.qemu_io("vm01", "d1.vhdx", "write -P 0x32 0 64k")
        out = a.cli("replica-machine", "vm01", "accept-reverse").stdout
        assert "vm01: Replicating (replica, reversed)" in out
        assert all(m["name"] != "vm01" for m in a.status()["machines"])
        # ... and site B protects the failed-over machine, replicating back to site A
        b.cli("replica-machine", "vm01", "reverse")
        b.wait(lambda: b.machine("vm01")["last_cycle"], "the first cycle of the reverse replication")
        st = b.machine("vm01")
        assert st["state"] == "Replicating" and st["target"] == f"https://127.0.0.1:{a.port}", st
        # a checksum resync against the adopted disks: only what changed travels (the disks hold 8 MiB of
        # incompressible data a full copy would send)
        assert st["last_cycle"]["kinds"] == ["resync"] and st["last_cycle"]["bytes_sent"] < 1 * MiB, st["last_cycle"]
        running_b = {n: b.disk_bytes(b.dir / "failover" / "vm01" / n) for n in NAMES}
        assert running_b["d0.vhdx"][12 * MiB:12 * MiB + 1024] == b"\x31" * 1024
        for d in a.replica_machine("vm01")["disks"]:
            same(a.replica_bytes(d["disk_id"]), running_b[d["name"]], f"site A's replica of {d['name']}")

        # a restart of site B keeps protecting the reverse machine from there
        b.stop()
        b.start()
        assert b.machine("vm01")["state"] == "Replicating"
        b.qemu_io("vm01", "d1.vhdx", "write -P 0x33 2M 64k")

        # failback: a planned failover the other way; site A's own disk files hold the machine again
        b.cli("machine", "vm01", "planned-failover")
        assert b.machine("vm01")["state"] == "FailbackComplete"
        running_b = {n: b.disk_bytes(b.dir / "failover" / "vm01" / n) for n in NAMES}
        a.cli("replica-machine", "vm01", "failover", "--planned")
        for n in NAMES:
            same(a.disk_bytes(a.dir / n), running_b[n], f"failback of {n}")
        b.cli("replica-machine", "vm01", "accept-reverse")
        a.cli("replica-machine", "vm01", "reverse")
        a.wait(lambda: a.machine("vm01")["last_cycle"], "the first cycle after the failback")
        st = a.machine("vm01")
        assert st["state"] == "Replicating" and st["last_cycle"]["kinds"] == ["resync"], st
        assert st["last_cycle"]["bytes_sent"] < 64 << 10, st["last_cycle"]      # nothing differs: nothing sent
        a.qemu_io("vm01", "d0.vhdx", "write -P 0x41 30M 64k")
        a.cli("machine", "vm01", "cycle")
        state = json.loads((a.dir / "state" / "machines" / "vm01.json").read_text())
        assert state["reversed"] is False and state["data"]["role"] == "primary"
        final = {n: a.disk_bytes(a.dir / n) for n in NAMES}
        m = b.replica_machine("vm01")
        assert m["role"] == "replica" and m["state"] == "Replicating" and not m["reversed"]
        for d in m["disks"]:
            same(b.replica_bytes(d["disk_id"]), final[d["name"]], f"site B's replica of {d['name']} after failback")
    finally:
        a.stop()
        b.stop()

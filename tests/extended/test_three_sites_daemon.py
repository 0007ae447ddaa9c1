"""Extended replication between three replicatord processes on loopback (mutual TLS, our own CA): site A
protects vm01 to site B; B forwards vm01 to site C ([[extended]], 5 minutes, driven here through B's admin
API). C's replica is byte-identical to A's disks at the cut; B's status shows the Extended relationship;
B killed with SIGKILL after forwarding resumes without loss; the extended site exports the point."""
from __future__ import annotations

import signal

from replicator.transport import certs

from ..daemon.two_sites import Site, make_pki, read_vhdx, same

MACHINES = {"vm01": [("vm01-a.vhdx", 16), ("vm01-b.vhdx", 8)]}


def three_sites(tmp_path, additional_points: int = 0):
    pki = make_pki(tmp_path)
    certs.issue(pki, "site-c")
    a = Site(tmp_path / "site-a", pki, "site-a", machines=MACHINES)
    b = Site(tmp_path / "site-b", pki, "site-b")
    c = Site(tmp_path / "site-c", pki, "site-c")
    a.write_config(b)
    b.extra = f'''
[[extended]]
machine = "vm01"
target = "https://127.0.0.1:{c.port}"
frequency = "5m"
additional_points = {additional_points}
'''
    b.write_config(a)
    c.write_config(b)
    return a, b, c


def test_three_sites(tmp_path):
    a, b, c = three_sites(tmp_path, additional_points=2)
    try:
        c.start()
        b.start()
        a.start()
        code, st = b.api("GET", "/v1/extended")
        assert code == 200 and st["extended"][0]["relationship"] == "Extended"
        code, first = b.api("POST", "/v1/extended/vm01/cycle")
        assert code == 200, first                  # initial copy to C, levelled at once
        ids = {d: a.machine("vm01")["disks"][d]["disk_id"] for d, _ in MACHINES["vm01"]}
        for disk, _ in MACHINES["vm01"]:
            same(c.replica_bytes(ids[disk]), a.disk_bytes(a.dir / disk), f"C's {disk} after the initial copy")

        for k in range(3):                          # three primary cycles over the same region
            a.qemu_io("vm01", "vm01-a.vhdx", f"write -P {0x61 + k} 2M 1M", "write -z 9M 64k")
            a.cli("machine", "vm01", "cycle")
        code, r = b.api("POST", "/v1/extended/vm01/cycle")
        assert code == 200, r
        assert r["bytes_changed"] <= 1 << 20 | 65536, r                # the merged change, not 3 cycles
        for disk, _ in MACHINES["vm01"]:
            same(c.replica_bytes(ids[disk]), a.disk_bytes(a.dir / disk), f"C's {disk} after merged cycles")

        a.qemu_io("vm01", "vm01-b.vhdx", "write -P 0x7e 1M 2M")
        a.cli("machine", "vm01", "cycle")
        b.stop(signal.SIGKILL)                     # B dies; its leg resumes at its next start
        b.start()
        code, r = b.api("POST", "/v1/extended/vm01/cycle")
        assert code == 200, r
        for disk, _ in MACHINES["vm01"]:
            same(c.replica_bytes(ids[disk]), a.disk_bytes(a.dir / disk), f"C's {disk} after B's restart")
        leg = b.api("GET", "/v1/extended")[1]["extended"][0]
        shown = b.cli("status").stdout
        assert "vm01 (Extended -> https://127.0.0.1:" in shown and "Replicating" in shown, shown
        token = (b.dir / "state" / "admin.token").read_text().strip()
        import urllib.request
        metrics = urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{b.admin}/metrics", headers={"Authorization": f"Bearer {token}"})).read().decode()
        assert 'replicator_health{machine="vm01",relationship="Extended"} 0' in metrics, metrics[:2000]
        assert leg["state"] == "Replicating" and leg["stats"]["health"] == "Normal", leg
        # site C on its own (A and B gone): a test failover, then an unplanned failover, of the latest point
        expected = {disk: a.disk_bytes(a.dir / disk) for disk, _ in MACHINES["vm01"]}
        a.stop(signal.SIGKILL)
        b.stop(signal.SIGKILL)
        c.cli("replica-machine", "vm01", "test-failover")
        for disk, _ in MACHINES["vm01"]:
            same(read_vhdx(c.dir / "test-failover" / "vm01" / disk), expected[disk], f"C's test failover {disk}")
        c.cli("replica-machine", "vm01", "cleanup-test-failover")
        c.cli("replica-machine", "vm01", "failover")
        for disk, _ in MACHINES["vm01"]:
            same(c.disk_bytes(c.dir / "failover" / "vm01" / disk), expected[disk], f"C's failed-over {disk}")
    finally:
        for s in (a, b, c):
            s.stop()


def test_failover_on_the_replica_site_keeps_the_extended_leg(tmp_path):
    a, b, c = three_sites(tmp_path)
    try:
        c.start()
        b.start()
        a.start()
        a.qemu_io("vm01", "vm01-a.vhdx", "write -P 0x41 1M 2M")
        a.cli("machine", "vm01", "cycle")
        assert b.api("POST", "/v1/extended/vm01/cycle")[0] == 200
        ids = {d: a.machine("vm01")["disks"][d]["disk_id"] for d, _ in MACHINES["vm01"]}
        a.stop(signal.SIGKILL)                         # site A is lost: B fails vm01 over
        b.cli("replica-machine", "vm01", "failover")
        b.cli("replica-machine", "vm01", "commit-failover")
        b.qemu_io("vm01", "vm01-a.vhdx", "write -P 0x52 5M 1M")        # the machine runs on B now
        leg = b.api("GET", "/v1/extended")[1]["extended"][0]
        assert leg["state"] == "Continued", leg
        st = b.machine("vm01")
        assert st["target"] == f"https://127.0.0.1:{c.port}", st
        b.cli("machine", "vm01", "cycle")
        st = b.machine("vm01")
        assert st["state"] == "Replicating" and st["last_cycle"]["bytes_sent"] < 2 << 20, st
        for disk, _ in MACHINES["vm01"]:
            same(c.replica_bytes(ids[disk]), b.disk_bytes(b.dir / "failover" / "vm01" / disk),
                 f"C's {disk} continued from B")
    finally:
        for s in (a, b, c):
            s.stop()


def test_replica_site_killed_mid_forward_resumes_without_loss(tmp_path):
    import os
    import threading
    import time

    a, b, c = three_sites(tmp_path)
    b.extra += 'bandwidth_limit = "1M"\n'
    b.write_config(a)
    try:
        c.start()
        b.start()
        a.start()
        assert b.api("POST", "/v1/extended/vm01/cycle")[0] == 200
        ids = {d: a.machine("vm01")["disks"][d]["disk_id"] for d, _ in MACHINES["vm01"]}
        a.qemu_io("vm01", "vm01-a.vhdx", "write -P 0x33 4M 1M")
        a.cli("machine", "vm01", "cycle")
        a.qemu_io("vm01", "vm01-b.vhdx", "write -P 0x34 0 1M")
        a.cli("machine", "vm01", "cycle")
        # random data so the stream cannot compress: several seconds at 1 MiB/s
        import random
        data = random.Random(5).randbytes(6 << 20)
        (tmp_path / "rand.bin").write_bytes(data)
        a.qemu_io("vm01", "vm01-a.vhdx", f"write -s {tmp_path / 'rand.bin'} 6M 6M")
        a.cli("machine", "vm01", "cycle")
        def forward():
            try:
                b.api("POST", "/v1/extended/vm01/cycle")
            except OSError:                              # B is killed under it
                pass
        threading.Thread(target=forward, daemon=True).start()
        outbox = b.dir / "state" / "extended" / "outbox"
        deadline = time.time() + 30
        while not any(outbox.iterdir()) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)                                  # the stream is on its way to C
        assert any(outbox.iterdir()), "the kill must come while a stream is pending"
        b.stop(signal.SIGKILL)
        b.start()
        code, r = b.api("POST", "/v1/extended/vm01/cycle")
        assert code == 200, r
        for disk, _ in MACHINES["vm01"]:
            same(c.replica_bytes(ids[disk]), a.disk_bytes(a.dir / disk), f"C's {disk} after B died mid-forward")
        assert list(outbox.iterdir()) == []
    finally:
        for s in (a, b, c):
            s.stop()

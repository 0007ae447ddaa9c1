"""replicatord under the faults issue 6 names: a disk that is missing (the rest of the daemon goes on, the
machine shows Critical with the reason, and is protected once the disk is back) and a replica that is
unreachable (clear error, state kept, replication resumes and levels the replica)."""
from __future__ import annotations

from replicator.replica import ReplicaStore
from replicator.vhdx import create_vhdx

from ..externals import qemu_compare
from .test_replicatord import Site
from .two_sites import MiB, same, two_sites


def test_a_missing_disk_stops_only_its_machine(tmp_path):
    s = Site(tmp_path)
    with open(s.config, "a") as f:
        f.write(f'''
[[machine]]
name = "vm02"
disks = ["late.vhdx"]
target = "local://{tmp_path}/replica"
frequency = "15m"
''')
    s.start()
    try:
        machines = {m["name"]: m for m in s.status()["machines"]}
        assert machines["vm01"]["state"] == "Replicating"
        vm02 = machines["vm02"]
        assert vm02["state"] == "Error" and vm02["stats"]["health"] == "Critical"
        assert "late.vhdx: cannot open" in vm02["reason"]
        assert "vm02: Error" in s.cli("status") and "health Critical" in s.cli("status")
        with create_vhdx(str(tmp_path / "late.vhdx"), 16 * MiB) as d:       # the disk comes back
            d.write(MiB, b"\x5a" * 65536)
        s.cli("machine", "vm02", "cycle")          # the operator's attention protects it at once
        vm02 = {m["name"]: m for m in s.status()["machines"]}["vm02"]
        assert vm02["state"] == "Replicating", vm02
        disk_id = vm02["disks"]["late.vhdx"]["disk_id"]
        rd = ReplicaStore(str(tmp_path / "replica")).disk(disk_id)
        assert qemu_compare(rd.image_path, s.snapshot("late.vhdx"), "vhdx", "vhdx").returncode == 0
    finally:
        s.stop()


def test_an_unreachable_replica_is_an_error_until_it_is_back(tmp_path):
    a, b = two_sites(tmp_path, {"vm01": [("d0.vhdx", 16)]})
    b.start(ready=())
    a.start()
    try:
        b.stop()
        a.qemu_io("vm01", "d0.vhdx", "write -P 0x61 2M 1M")
        p = a.cli("machine", "vm01", "cycle", check=False)
        assert p.returncode != 0 and "unreachable" in (p.stdout + p.stderr), p.stdout + p.stderr
        st = a.status()["machines"][0]
        assert st["state"] == "Error" and st["stats"]["health"] == "Critical", st
        b.start(ready=())
        a.cli("machine", "vm01", "cycle")
        st = a.status()["machines"][0]
        assert st["state"] == "Replicating", st
        [disk] = b.replica_machine("vm01")["disks"]
        same(b.replica_bytes(disk["disk_id"]), a.disk_bytes(a.dir / "d0.vhdx"), "replica after the outage")
    finally:
        a.stop()
        b.stop()

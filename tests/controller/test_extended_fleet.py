"""Extended replication driven by the controller (issue 17 item 5): three replicatord processes on loopback
(primary p1 on site east, replica r1 on west, extended replica x1 on a third site) registered to one controller
with keys; the pair's extended leg is made through the REST API only. The machine enabled through the API ends
with x1's copy byte-identical to p1's disk at the cut, and the controller shows the leg the replica host
reports. The leg's 5-minute schedule is not waited for: its cycles are asked of r1's admin API, as the
tests under tests/extended do."""
from __future__ import annotations

import json
import os

from replicator.cli import main as cli
from replicator.vhdx import create_vhdx

from ..daemon.two_sites import same
from .test_fleet import FleetHost, replica_bytes, wait
from .test_host_channel import ControllerProc

MiB = 1 << 20


def test_a_machine_enabled_on_an_extended_pair_reaches_the_third_site(tmp_path, database_url_pg, capsys):
    ctl = ControllerProc(tmp_path, database_url_pg, cert_lifetime=3600).start()
    hosts: list[FleetHost] = []
    try:
        for site in ("east", "west", "north"):
            ctl.ok("POST", "/v1/sites", {"name": site})
        p1, r1, x1 = (FleetHost(tmp_path, name, ctl, ctl.key_file(tmp_path, site))
                      for name, site in (("p1", "east"), ("r1", "west"), ("x1", "north")))
        hosts += [p1, r1, x1]
        (p1.dir / "disks").mkdir()
        disk = p1.dir / "disks" / "vm01-os.vhdx"
        with create_vhdx(str(disk), 16 * MiB, block_size=MiB) as d:
            d.write(0, b"\x51" * MiB)
            d.write(8 * MiB, os.urandom(2 * MiB))
        for h in hosts:
            h.start()
        wait(lambda: len(ctl.ok("GET", "/v1/hosts")) == 3, "three hosts registered", hosts)

        for cloud, site in (("gold", "east"), ("gold-dr", "west"), ("gold-ext", "north")):
            ctl.ok("POST", "/v1/clouds", {"name": cloud, "site": site})
        for h, cloud in ((p1, "gold"), (r1, "gold-dr"), (x1, "gold-ext")):
            ctl.ok("PUT", f"/v1/hosts/{h.name}/cloud", {"cloud": cloud})
        ctl.ok("POST", "/v1/policies", {"name": "p5", "frequency": "5m"})
        ctl.ok("POST", "/v1/pairs", {"name": "gold-pair", "primary": "gold", "recovery": "gold-dr", "policy": "p5"})
        # the leg through the CLI: a bad frequency is one line, then the leg is made
        base = ["--controller", ctl.url, "--token", str(ctl.data / "admin.token"), "--ca", ctl.ca_path]
        assert cli([*base, "pair", "extend", "gold-pair", "--cloud", "gold-ext", "--frequency", "30s"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "5m or 15m" in err, err
        assert cli([*base, "pair", "extend", "gold-pair", "--cloud", "gold-ext", "--frequency", "5m",
                    "--additional-points", "1"]) == 0
        capsys.readouterr()
        assert cli([*base, "pair", "show-extended", "gold-pair"]) == 0
        leg = json.loads(capsys.readouterr().out)
        assert leg["cloud"] == "gold-ext" and leg["frequency"] == 300 and leg["machines"] == {}
        ctl.ok("POST", "/v1/machines", {"name": "vm01", "cloud": "gold", "primary_host": "p1",
                                        "disks": [str(disk)]})
        assert ctl.ok("GET", "/v1/pairs/gold-pair/extended")["machines"] == {"vm01": "x1"}

        wait(lambda: p1.machine("vm01")["state"] == "Replicating"
             and p1.machine("vm01")["stats"]["successful_cycles"] >= 1, "vm01 replicating on p1", hosts, 90)
        wait(lambda: [g["machine"] for g in r1.api("GET", "/v1/extended")["extended"]] == ["vm01"],
             "r1 running vm01's extended leg", hosts)
        wait(lambda: x1.api("GET", "/v1/status")["replica"] is not None, "x1 serving as the extended replica",
             hosts)

        p1.qemu_io("vm01", disk.name, "write -P 0x61 2M 1M", "write -z 9M 64k")
        assert p1.api("POST", "/v1/machines/vm01/cycle?wait=1")["state"] == "Replicating"
        first = r1.api("POST", "/v1/extended/vm01/cycle")                  # the initial copy, levelled
        assert first.get("point") is not None, first
        disk_id = p1.machine("vm01")["disks"][disk.name]["disk_id"]
        same(replica_bytes(x1.state / "replica", disk_id), p1.disk_bytes(disk), "x1's copy after the first cycle")

        p1.qemu_io("vm01", disk.name, "write -P 0x62 5M 1M")
        assert p1.api("POST", "/v1/machines/vm01/cycle?wait=1")["state"] == "Replicating"
        r1.api("POST", "/v1/extended/vm01/cycle")
        same(replica_bytes(x1.state / "replica", disk_id), p1.disk_bytes(disk), "x1's copy at the next cut")

        # the controller shows the relationship as r1 reports it
        wait(lambda: ctl.ok("GET", "/v1/machines/vm01")["extended"]["state"] == "Replicating",
             "the controller to show the extended leg", hosts)
        shown = ctl.ok("GET", "/v1/machines/vm01")["extended"]
        assert shown["relationship"] == "Extended" and shown["host"] == "x1" and shown["health"] == "Normal", shown
        assert shown["target"] == f"https://127.0.0.1:{x1.data}" and shown["last_success_at"], shown
    finally:
        for h in hosts:
            h.stop()
        ctl.stop()

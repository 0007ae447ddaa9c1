"""The extended leg over Kerberos (issue 17: "over the same transport and authentication choices"): replica
site B forwards to a third site C that only speaks SPNEGO against a real MIT KDC, authenticated as B's
principal from its ticket cache (KRB5CCNAME, as replicatord runs it); C ends byte-identical to the primary."""
from __future__ import annotations

import asyncio

from replicator.daemon.extended import ExtendedLeg, ExtendedSettings
from replicator.targets.factory import open_target
from replicator.transport import AuthorizationEntry
from replicator.transport.server import ReplicaServer

from ..daemon.primary_harness import MiB, Machine
from ..transport.conftest import kdc, pki, servers  # noqa: F401 -- the real KDC and server fixtures
from ..transport.kdc import REALM
from .test_extended_leg import site_c_bytes

DISKS = (("d0.vhdx", 8),)


def test_the_extended_leg_authenticates_with_kerberos(tmp_path, kdc, servers, monkeypatch):  # noqa: F811
    c = servers.start(ReplicaServer([AuthorizationEntry(f"primary1@{REALM}", str(tmp_path / "c"))],
                                    mode="kerberos", port=0, keytab=kdc.path("server.keytab")))
    monkeypatch.setenv("KRB5CCNAME", kdc.ccaches["primary1"])
    settings = ExtendedSettings(machine="vm01", target=f"http://localhost:{c.port}", kerberos=True,
                                storage=str(tmp_path / "replica"))

    async def main():
        m = Machine(tmp_path, disks=DISKS, start=1.75e9)
        try:
            await m.tick()
            await m.tick()
            leg = ExtendedLeg(settings, open_target(settings.target, kerberos=True, machine="vm01"),
                              str(tmp_path / "b-state"))
            await leg.cycle()
            await m.write("d0.vhdx", MiB, b"\x5e" * MiB)
            m.set_time(m.clock.now() + 30)
            await m.tick()
            res = await leg.cycle()
            assert res.point is not None and leg.status()["state"] == "Replicating"
            disk_id = str(m.pm.disks["d0.vhdx"].virtual_disk_id)
            return disk_id, await m.primary_bytes("d0.vhdx")
        finally:
            await m.close()
    disk_id, expected = asyncio.run(main())
    assert site_c_bytes(tmp_path, disk_id) == expected
    assert c.counters.get("refused:unauthenticated", 0) == 0

"""Three sites in one process, on real disks and real replica stores: a primary machine (its export, its
trackers, two disks) replicating every 30 s (fake clock) to replica site B, and B's extended leg forwarding
every 5 minutes to site C. C's points export byte-identical to the primary at their cuts; the extended
stream carries the merged change, not the sum of B's cycles; a leg killed between sending and recording
resumes without loss."""
from __future__ import annotations

import asyncio
import os
import uuid

from replicator.daemon.extended import ExtendedLeg, ExtendedSettings
from replicator.replica import ReplicaStore
from replicator.targets.factory import open_target
from replicator.vhdx import VhdxDisk

from ..daemon.primary_harness import MiB, Machine

DISKS = (("d0.vhdx", 16), ("d1.vhdx", 8))


def leg_for(tmp_path, **kw) -> ExtendedLeg:
    settings = ExtendedSettings(machine="vm01", target=f"local://{tmp_path / 'c'}",
                                storage=str(tmp_path / "replica"), **kw)
    return ExtendedLeg(settings, open_target(settings.target), str(tmp_path / "b-state"))


def site_c_bytes(tmp_path, disk_id: str, generation: int | None = None) -> bytes:
    d = ReplicaStore(str(tmp_path / "c")).disk(disk_id)
    out = str(tmp_path / f"c-{disk_id}-{generation}.vhdx")
    if os.path.exists(out):
        os.unlink(out)
    d.materialize(d.generation if generation is None else generation, out)
    with VhdxDisk.open(out) as v:
        return v.read(0, v.size)


def test_three_sites_forward_merged_cuts_byte_identical(tmp_path):
    async def main():
        m = Machine(tmp_path, "additional_points = 2", disks=DISKS, start=1.75e9)
        try:
            await m.tick()                                   # initial replication to B
            await m.tick()
            assert m.state == "Replicating"
            ids = {n: str(m.pm.disks[n].virtual_disk_id) for n, _ in DISKS}
            leg = leg_for(tmp_path, additional_points=2)
            first = await leg.cycle()                        # C's initial copy, levelled at once
            assert leg.state == "Replicating" and first.point is not None
            for n, _ in DISKS:
                assert site_c_bytes(tmp_path, ids[n]) == await m.primary_bytes(n), n

            # five primary cycles rewriting the same 1 MiB of d0 and a little of d1
            for k in range(5):
                await m.write("d0.vhdx", 2 * MiB, bytes([0x30 + k]) * MiB)
                await m.write("d1.vhdx", k * 65536, bytes([0x50 + k]) * 65536)
                m.set_time(m.clock.now() + 30)
                await m.tick()
            expected = {n: await m.primary_bytes(n) for n, _ in DISKS}
            sum_of_cycles = 5 * (MiB + 65536)
            res = await leg.cycle()
            assert res.bytes_changed == MiB + 5 * 65536 < sum_of_cycles      # merged: last write wins
            for n, _ in DISKS:
                assert site_c_bytes(tmp_path, ids[n]) == expected[n], n
            c = ReplicaStore(str(tmp_path / "c"))
            assert all(c.disk(ids[n]).state.cuts[-1][0] == res.point for n, _ in DISKS)
            assert c.disk(ids["d0.vhdx"]).state.machine == "vm01"
            st = leg.status()
            assert st["relationship"] == "Extended" and st["state"] == "Replicating"
        finally:
            await m.close()
    asyncio.run(main())


def test_leg_interrupted_after_sending_resumes_without_loss(tmp_path):
    async def main():
        m = Machine(tmp_path, "", disks=(("d0.vhdx", 16),), start=1.75e9)
        try:
            await m.tick()
            await m.tick()
            disk_id = str(m.pm.disks["d0.vhdx"].virtual_disk_id)
            leg = leg_for(tmp_path)
            await leg.cycle()
            await m.write("d0.vhdx", 5 * MiB, b"\x77" * (3 * MiB))
            m.set_time(m.clock.now() + 30)
            await m.tick()
            expected = await m.primary_bytes("d0.vhdx")

            class Dies(Exception):
                pass

            real_commit = leg.target.commit

            async def commit_then_die(disk, stream):        # the process dies right after C committed
                await real_commit(disk, stream)
                raise Dies()
            leg.target.commit = commit_then_die
            try:
                await leg.cycle()
            except Dies:
                pass
            # a new process: the leg's state says a stream is pending; C has it already
            again = leg_for(tmp_path)
            assert again.data["disks"][disk_id]["pending"] is not None
            await m.write("d0.vhdx", 0, b"\x78" * 4096)
            m.set_time(m.clock.now() + 30)
            await m.tick()
            expected = await m.primary_bytes("d0.vhdx")
            await again.cycle()
            assert site_c_bytes(tmp_path, disk_id) == expected
            assert os.listdir(tmp_path / "b-state" / "extended" / "outbox") == []
            assert ReplicaStore(str(tmp_path / "c")).disk(disk_id).generation == 4     # initial + level, the interrupted one, this one
            uuid.UUID(disk_id)
        finally:
            await m.close()
    asyncio.run(main())


def test_initial_replication_of_the_leg_from_a_seed(tmp_path):
    from replicator.seed.importer import import_seed
    from replicator.daemon.extended import NothingYet

    async def main():
        m = Machine(tmp_path, "", disks=DISKS, start=1.75e9)
        try:
            await m.tick()
            await m.tick()
            ids = {n: str(m.pm.disks[n].virtual_disk_id) for n, _ in DISKS}
            seed_dir = tmp_path / "usb"
            leg = leg_for(tmp_path, seed_dir=str(seed_dir))
            try:
                await leg.cycle()
                raise AssertionError("the leg must wait for the seed")
            except NothingYet as e:
                assert "seed import" in e.message
            assert leg.state == "WaitingForSeed"
            await m.write("d0.vhdx", 3 * MiB, b"\x5c" * MiB)      # after the seed's cut, before the import
            m.set_time(m.clock.now() + 30)
            await m.tick()
            c = open_target(f"local://{tmp_path / 'c'}")
            await import_seed(str(seed_dir / "vm01"), c)           # carried to site C and imported there
            sent_before = ReplicaStore(str(tmp_path / "c")).disk(ids["d0.vhdx"]).generation
            res = await leg.cycle()
            assert leg.state == "Replicating"
            assert res.bytes_sent < 2 * MiB                         # the change since the cut, not the disks
            for n, _ in DISKS:
                assert site_c_bytes(tmp_path, ids[n]) == await m.primary_bytes(n), n
            assert ReplicaStore(str(tmp_path / "c")).disk(ids["d0.vhdx"]).generation == sent_before + 1
        finally:
            await m.close()
    asyncio.run(main())


def test_the_leg_runs_on_its_schedule_and_stops_cleanly(tmp_path):
    async def main():
        m = Machine(tmp_path, "", disks=(("d0.vhdx", 8),), start=1.75e9)
        try:
            await m.tick()
            await m.tick()
            leg = leg_for(tmp_path)
            leg.settings.frequency = 0.3                 # seconds here; 5 or 15 minutes in a configuration
            stop = asyncio.Event()
            task = asyncio.create_task(leg.run(stop))
            for _ in range(600):                          # the first cycle runs at once
                if leg.state == "Replicating":
                    break
                await asyncio.sleep(0.05)
            assert leg.state == "Replicating"
            await m.write("d0.vhdx", MiB, b"\x42" * 4096)
            m.set_time(m.clock.now() + 30)
            await m.tick()
            before = leg.stats.successful
            for _ in range(600):                          # and again at its frequency (a loaded machine: slow)
                if leg.stats.successful > before + 1:
                    break
                await asyncio.sleep(0.05)
            assert leg.stats.successful > before + 1
            stop.set()
            await asyncio.wait_for(task, 5)
            disk_id = str(m.pm.disks["d0.vhdx"].virtual_disk_id)
            assert site_c_bytes(tmp_path, disk_id) == await m.primary_bytes("d0.vhdx")
        finally:
            await m.close()
    asyncio.run(main())


def test_the_machines_domain_configuration_goes_on_to_the_extended_site(tmp_path):
    from replicator.daemon.domains import CONFIG_FILE, replicated_domain, write_config
    from replicator.hypervisor.base import Boot, Disk, DiskSource, DomainConfig, Nic

    async def main():
        m = Machine(tmp_path, "", disks=DISKS, start=1.75e9)
        try:
            await m.tick()
            await m.tick()
            ids = [str(m.pm.disks[n].virtual_disk_id) for n, _ in DISKS]
            config = DomainConfig(name="vm01", uuid=str(uuid.uuid4()), vcpus=2, memory_kib=1 << 20, boot=Boot(),
                                  disks=(Disk("vda", "virtio", "disk", DiskSource("file", "/srv/a.vhdx")),),
                                  nics=(Nic("52:54:00:00:00:01", "virtio", "network", "lan"),), guest_agent=True)
            payload = {"version": 1, "domain": config.to_dict(), "targets": {"vda": ids[0]}, "time": 1.75e9}
            b_disks = [str(tmp_path / "replica" / "disks" / i) for i in ids]
            for d in b_disks:                               # as the primary's PUT /v1/disks/ID/domain keeps it
                write_config(d, payload)
            leg = leg_for(tmp_path)
            await leg.cycle()
            c_disks = [str(tmp_path / "c" / "disks" / i) for i in ids]
            assert all(os.path.exists(os.path.join(d, CONFIG_FILE)) for d in c_disks)
            assert replicated_domain(c_disks)["domain"]["name"] == "vm01"
            sent = os.path.getmtime(os.path.join(c_disks[0], CONFIG_FILE))
            await m.write("d0.vhdx", MiB, b"\x43" * 4096)
            m.set_time(m.clock.now() + 30)
            await m.tick()
            await leg.cycle()                               # unchanged: not sent again
            assert os.path.getmtime(os.path.join(c_disks[0], CONFIG_FILE)) == sent
        finally:
            await m.close()
    asyncio.run(main())

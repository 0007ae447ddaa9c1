"""The initial replication modes of replicatord: over the network at a scheduled time (FakeClock, and one
real daemon woken at the moment), from an offline seed exported by the daemon and imported by an operator,
and from existing copies on the replica that only differing blocks level. Each ends with the replica
compared byte for byte with the primary."""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import time

from replicator.vhdx import VhdxDisk

from .primary_harness import MiB, Daemon, Machine, local_time


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


SCHEDULED = 'initial_replication = { mode = "scheduled", at = 22:00:00 }'


def test_scheduled_initial_replication_waits_for_its_time_of_day(tmp_path):
    async def main():
        m = Machine(tmp_path, SCHEDULED, start=local_time(2025, 6, 2, 21))
        try:
            assert await m.tick() is None and m.state == "ReadyForInitialReplication"
            assert m.pm.state.reason == ("initial replication scheduled for 2025-06-02 22:00:00; "
                                         "`replicator machine vm01 cycle` starts it now")
            assert m.pm.due_at() == local_time(2025, 6, 2, 22) and m.jobs.summaries() == []
            m.set_time(local_time(2025, 6, 2, 21, 59, 59))
            assert await m.tick() is None
            m.set_time(local_time(2025, 6, 2, 22, 0, 30))
            assert [r.kind for r in await m.tick()] == ["initial"] and m.state == "Replicating"
            assert m.pm.state.history[0]["reason"] == "scheduled initial replication over the network"
            [job] = m.jobs.summaries()
            assert job["kind"] == "initial" and job["state"] == "succeeded"
            assert job["bytes_done"] == job["bytes_total"] > 0
            assert await m.replica_equals_primary()
        finally:
            await m.close()
    run(main())


def test_the_scheduled_time_survives_a_restart_and_an_operator_can_start_early(tmp_path):
    async def main():
        m = Machine(tmp_path, SCHEDULED, start=local_time(2025, 6, 2, 22, 30))    # just after 22:00: tomorrow
        assert await m.tick() is None and m.pm.due_at() == local_time(2025, 6, 3, 22)
        await m.close()
        m = Machine(tmp_path, SCHEDULED, start=local_time(2025, 6, 3, 9), reopen=True)
        try:
            assert m.pm.due_at() == local_time(2025, 6, 3, 22)               # not moved by the restart
            job, task = await m.pm.begin("cycle")
            await task
            assert job.state.value == "succeeded" and job.kind == "initial" and m.state == "Replicating"
            assert await m.replica_equals_primary()
        finally:
            await m.close()
    run(main())


def test_existing_mode_is_refused_for_a_target_that_cannot_level_a_copy(tmp_path):
    async def main():
        m = Machine(tmp_path, 'initial_replication = { mode = "existing", path = "old" }',
                    target="azure://devstoreaccount1/replicas")
        try:
            assert await m.tick() is None and m.state == "ReadyForInitialReplication"
            assert "azure://devstoreaccount1/replicas cannot: use" in m.pm.state.reason
            job, task = await m.pm.begin("cycle")
            await task
            assert job.state.value == "failed" and "cannot" in job.error
        finally:
            await m.close()
    run(main())


def test_scheduled_start_wakes_a_real_daemon_at_its_moment(tmp_path):
    at = dt.datetime.now() + dt.timedelta(seconds=12)
    if at.date() != dt.date.today():                 # keep the time of day on this side of midnight
        time.sleep(5)
        at = dt.datetime.now() + dt.timedelta(seconds=12)
    d = Daemon(tmp_path, f'initial_replication = {{ mode = "scheduled", at = {at.strftime("%H:%M:%S")} }}',
               disks=(("d0.vhdx", 16),))
    try:
        st = d.start(until="ReadyForInitialReplication")
        st = d.wait(lambda m: "scheduled for" in m["reason"])
        assert st["starts_at"] is not None and abs(st["starts_at"] - at.replace(microsecond=0).timestamp()) < 1
        assert "scheduled for " + at.strftime("%Y-%m-%d %H:%M:%S") in d.cli("status")
        st = d.wait(lambda m: m["state"] == "Replicating", timeout=30)     # frequency is 15 min: woken
        assert time.time() >= at.replace(microsecond=0).timestamp()
        assert d.replica_equals_primary()
    finally:
        d.stop()


def test_offline_seed_export_import_then_delta_cycles(tmp_path):
    d = Daemon(tmp_path, 'initial_replication = { mode = "offline", seed_dir = "seed" }')
    seed = tmp_path / "seed" / "vm01"
    try:
        st = d.start(until="WaitingForInitialReplication")
        assert f"offline seed written to {seed}" in st["reason"]
        assert f"replicator seed import {seed} --replica-root {tmp_path / 'replica'}" in st["reason"]
        [export] = [j for j in d.jobs() if j["kind"] == "seed-export"]
        assert export["state"] == "succeeded" and export["bytes_done"] == export["bytes_total"] == 48 * MiB
        # the VM writes after the export's cut; an operator asks for a cycle before importing: refused
        d.qemu_io("d0.vhdx", "write -P 0x33 7M 2M")
        d.qemu_io("d1.vhdx", "write -P 0x34 100k 8k")
        early = d.run("machine", "vm01", "cycle", "--wait", check=False)
        assert early.returncode == 1 and "the replica does not hold it yet" in early.stderr
        st = d.machine()
        assert st["state"] == "WaitingForInitialReplication" and "d1.vhdx (generation 0 of 1)" in st["reason"]
        assert f"replicator seed import {seed} --replica-root {tmp_path / 'replica'}" in st["reason"]
        imported = d.run("seed", "import", str(seed), "--replica-root", str(tmp_path / "replica"), config=False)
        assert imported.returncode == 0
        out = d.cli("machine", "vm01", "cycle")
        assert out.startswith("vm01: Replicating")
        assert d.replica_equals_primary()
        d.qemu_io("d0.vhdx", "write -P 0x35 0 64k")
        d.cli("machine", "vm01", "cycle")
        assert d.replica_equals_primary()
    finally:
        d.stop()


def test_existing_copies_on_the_replica_are_levelled_with_only_differing_blocks(tmp_path):
    d = Daemon(tmp_path, 'initial_replication = { mode = "existing", path = "old" }\ncompression = false')
    noise = os.urandom(6 * MiB)
    with VhdxDisk.open(str(tmp_path / "d0.vhdx"), read_only=False) as disk:
        disk.write(2 * MiB, noise)
    os.makedirs(tmp_path / "old")
    for n in d.disk_names:                            # yesterday's copies, restored on the replica host
        shutil.copy(tmp_path / n, tmp_path / "old" / n)
    with VhdxDisk.open(str(tmp_path / "d0.vhdx"), read_only=False) as disk:
        disk.write(5 * MiB, b"\x99" * 65536)
    with VhdxDisk.open(str(tmp_path / "d1.vhdx"), read_only=False) as disk:
        disk.write(9 * MiB, b"\x98" * 4096)
    try:
        st = d.start(until="Replicating")
        assert st["last_cycle"]["kinds"] == ["resync"]
        assert st["last_cycle"]["bytes_sent"] < 512 * 1024               # not the 7 MiB a full copy sends
        [job] = d.jobs()
        notes = [e["text"] for e in d.job(job["id"])["log"]]
        assert job["kind"] == "initial" and job["state"] == "succeeded"
        assert f"d0.vhdx: the replica starts from {tmp_path / 'old' / 'd0.vhdx'}" in notes
        assert d.replica_equals_primary()
        d.qemu_io("d1.vhdx", "write -P 0x21 1M 1M")
        d.cli("machine", "vm01", "cycle")
        assert d.replica_equals_primary()
    finally:
        d.stop()

"""A primary machine (PrimaryMachine with its NBD export, in this process) at an epoch from the host's
fencing table, replicating to a real replica server over mutual TLS: fenced after a failover on the
replica site, it sends nothing more and says why in one line; an operator's resume tries once again; a
reload with a raised epoch lets it replicate again where the replica has that epoch."""
from __future__ import annotations

import asyncio
import json

import pytest

from replicator.daemon import fencing
from replicator.orchestration.states import StateError
from replicator.transport import AuthorizationEntry, Fenced, ReplicaClient

from ..daemon.primary_harness import Machine

LINE = ("fenced: the replica site failed this machine over at epoch 4; this host's epoch is 3: no cycles until "
        "the epoch is raised or `replicator machine vm01 resume`")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def replica(servers, tmp_path):
    """A replica server storing where the harness compares bytes (tmp_path/replica)."""
    server = servers.cert([AuthorizationEntry("primary*", str(tmp_path / "replica"))])
    return server, server.stores()[str(tmp_path / "replica")]


def machine(tmp_path, server, pki, reopen: bool = False) -> Machine:
    p = pki.pair("primary1")
    extra = f'cert = "{p["cert"]}"\nkey = "{p["key"]}"\nca = "{p["ca"]}"\n'
    return Machine(tmp_path, extra, target=server.url, reopen=reopen)


def test_a_fenced_primary_stops_until_its_epoch_is_raised(servers, pki, tmp_path):
    server, store = replica(servers, tmp_path)
    fencing.save(str(tmp_path / "state"), {"vm01": fencing.Entry(3, "primary")})

    async def replicate_then_fenced():
        m = machine(tmp_path, server, pki)
        try:
            assert await m.tick() and m.state == "Replicating"
            disk_id = str(m.pm.disks["d0.vhdx"].virtual_disk_id)
            assert store.disk(disk_id).state.epoch == 3 and await m.replica_equals_primary()
            # the replica site fails the machine over (its store's failover path)
            store.disk(disk_id).set_failover({"machine": "vm01", "point": 1, "time": 0.0, "path": "/nowhere"})
            await m.write("d0.vhdx", 1 << 20, b"\x5a" * 65536)
            with pytest.raises(Fenced):
                await m.tick()
            st = m.pm.status()
            assert st["state"] == "Error" and st["reason"] == LINE
            assert st["fenced"]["epoch"] == 3 and st["fenced"]["replica_epoch"] == 4 and st["epoch"] == 3
            refused, requests = server.counters["rejected_fenced"], server.counters["requests"]
            assert refused == 1
            # no more requests: the scheduler's ticks do nothing (not even a cut), an operator hears why
            await m.write("d0.vhdx", 3 << 20, b"\x7c" * 4096)
            sealed = len(m.pm.disks["d0.vhdx"].state.sealed_logs)
            assert await m.tick() is None
            await asyncio.to_thread(m.pm.export.refresh)
            assert len(m.pm.disks["d0.vhdx"].state.sealed_logs) == sealed
            with pytest.raises(StateError) as e:
                await m.pm.cycle_now()
            assert LINE in e.value.message
            with pytest.raises(StateError):
                await m.pm.begin("resync")
            assert server.counters["requests"] == requests
            # an operator's resume lifts the fence once: one more try, fenced again at the same epoch
            m.pm.resume()
            assert m.pm.state.fenced is None
            with pytest.raises(Fenced):
                await m.tick()
            assert server.counters["rejected_fenced"] == refused + 1 and m.pm.state.fenced is not None
            return disk_id
        finally:
            await m.close()
    disk_id = run(replicate_then_fenced())
    saved = json.loads((tmp_path / "state" / "machines" / "vm01.json").read_text())
    assert saved["fenced"]["replica_epoch"] == 4 and saved["reason"] == LINE

    # a restart at the same epoch stays fenced (the mark is kept with the state)
    async def restarted_same_epoch():
        m = machine(tmp_path, server, pki, reopen=True)
        try:
            requests = server.counters["requests"]
            assert await m.tick() is None and server.counters["requests"] == requests
            assert m.pm.status()["fenced"] is not None
        finally:
            await m.close()
    run(restarted_same_epoch())

    # the failover is cancelled on the replica site (the epoch it made stays), and the controller hands
    # this host that epoch: the reload lifts the fence and cycles at epoch 4 are taken
    store.disk(disk_id).set_failover(None)
    fencing.update(str(tmp_path / "state"), {"vm01": {"epoch": 4, "role": "primary"}})

    async def raised():
        m = machine(tmp_path, server, pki, reopen=True)
        try:
            assert m.pm.state.fenced is None and "raised to 4" in m.pm.state.reason
            await m.write("d0.vhdx", 2 << 20, b"\x6b" * 65536)
            assert await m.tick() and m.state == "Replicating"
            assert await m.replica_equals_primary()
            assert store.disk(disk_id).state.epoch == 4
        finally:
            await m.close()
    run(raised())


def test_leaving_the_fencing_table_means_standalone(servers, pki, tmp_path):
    """A machine taken out of the table sends no epoch (as without a controller); its fence is lifted."""
    server, _ = replica(servers, tmp_path)
    state_dir = str(tmp_path / "state")
    fencing.save(state_dir, {"vm01": fencing.Entry(2, "primary")})

    async def go(reopen: bool):
        m = machine(tmp_path, server, pki, reopen=reopen)
        try:
            if not reopen:
                assert await m.tick()
                # another primary host of the machine (same trust group) talks to the replica at epoch 9
                disk_id = m.pm.disks["d0.vhdx"].virtual_disk_id
                async with ReplicaClient(server.url, epoch=9, **pki.pair("primary2")) as newer:
                    assert (await newer.state(disk_id))["epoch"] == 9
                await m.write("d0.vhdx", 4096, b"\x12" * 4096)
                with pytest.raises(Fenced):
                    await m.tick()
                assert "the replica knows epoch 9 for this machine (a newer primary took it over)" in m.pm.state.reason
            else:
                assert m.pm.epoch is None and m.pm.state.fenced is None and "standalone" in m.pm.state.reason
                assert await m.tick() and await m.replica_equals_primary()
        finally:
            await m.close()
    run(go(False))
    fencing.save(state_dir, {})
    run(go(True))

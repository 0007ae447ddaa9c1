"""Adversarial checks of the extended leg (daemon/extended.py, replica/forward.py) against real replica
stores: B's store fed by real streams, C a real store through a local:// target. Each test names the way
site C could end up not byte-identical to B at a point it claims, and checks it does not."""
from __future__ import annotations

import asyncio
import io
import os
import threading
import uuid

import pytest

from replicator import delta
from replicator.daemon.extended import ExtendedLeg, ExtendedSettings
from replicator.errors import UsageError
from replicator.replica import ReplicaStore
from replicator.replica.forward import ChangeJournal
from replicator.replica.store import ReplicaDisk
from replicator.targets.factory import open_target
from replicator.vhdx import VhdxDisk

MiB = 1 << 20
SIZE = 8 * MiB


def send(store: ReplicaStore, disk_id: uuid.UUID, generation: int, writes, machine: str = "vm01") -> None:
    """One committed cycle on B, as a primary's stream would make it."""
    d = store.ensure_disk(disk_id, SIZE, block_size=MiB, machine=machine)
    d.commit(upload(d, disk_id, generation, writes))


def upload(d, disk_id: uuid.UUID, generation: int, writes) -> str:
    header = delta.StreamHeader(disk_id=disk_id, disk_size=SIZE, block_size=MiB, generation=generation,
                                base_generation=generation - 1, created=1.7e9 + generation)
    sink = io.BytesIO()
    with delta.DeltaEncoder(header, sink) as enc:
        for off, data in writes:
            enc.add_data(off, data)
        enc.finish()
    stream = str(uuid.uuid4())
    up = d.open_upload(stream)
    up.write(0, sink.getvalue())
    up.sync()
    up.close()
    return stream


def leg_for(tmp_path, machine: str = "vm01") -> ExtendedLeg:
    settings = ExtendedSettings(machine=machine, target=f"local://{tmp_path / 'c'}", storage=str(tmp_path / "b"))
    return ExtendedLeg(settings, open_target(settings.target, retries=1), str(tmp_path / "b-state"))


def image_bytes(root, disk_id, tmp_path, tag: str) -> tuple[int, bytes]:
    d = ReplicaStore(str(root)).disk(disk_id)
    out = str(tmp_path / f"{tag}-{disk_id}.vhdx")
    if os.path.exists(out):
        os.unlink(out)
    d.materialize(d.generation, out)
    with VhdxDisk.open(out) as v:
        data = v.read(0, v.size)
    os.unlink(out)
    return d.generation, data


def c_equals_b(tmp_path, disk_id) -> bool:
    return image_bytes(tmp_path / "c", disk_id, tmp_path, "c")[1] == image_bytes(tmp_path / "b", disk_id, tmp_path,
                                                                                 "b")[1]


class Dies(Exception):
    """The process is killed here."""


def test_two_legs_never_delete_each_others_pending_streams(tmp_path):
    """Every leg of a replica host shares STATE_DIR/extended/outbox. A leg that dies after persisting its
    initial copy (before sending it) must find it again: another machine's leg tidying the outbox must not
    take it (it did: the first leg then sent a delta on an empty disk, and C held only the changes)."""
    async def main():
        b = ReplicaStore(str(tmp_path / "b"))
        d1, d2 = uuid.uuid4(), uuid.uuid4()
        send(b, d1, 1, [(0, b"\x11" * (2 * MiB)), (5 * MiB, b"\x12" * MiB)], machine="vm01")
        send(b, d2, 1, [(0, b"\x21" * MiB)], machine="vm02")
        leg1 = leg_for(tmp_path, "vm01")

        async def dies(*a, **k):
            raise Dies()
        leg1.target.send = dies
        with pytest.raises(Dies):
            await leg1.cycle()                       # initial copy persisted as pending, then killed
        await leg_for(tmp_path, "vm02").cycle()      # the other machine's leg runs meanwhile
        send(b, d1, 2, [(MiB, b"\x13" * 4096)], machine="vm01")
        again = leg_for(tmp_path, "vm01")            # a new process
        for _ in range(2):
            try:
                await again.cycle()
            except Exception:
                pass
        assert c_equals_b(tmp_path, d1)
    asyncio.run(main())


def test_a_replica_disk_made_again_under_the_same_id_is_copied_again(tmp_path):
    """Protection removed on B and enabled again (the primary's disk keeps its id): B's replica is a new
    disk from generation 1, its change journal gone with the old folder. The leg's record of what it
    forwarded belongs to the old disk; going on from it sent none of the new disk's data to C."""
    async def main():
        b = ReplicaStore(str(tmp_path / "b"))
        d = uuid.uuid4()
        send(b, d, 1, [(0, b"\x01" * MiB)])
        for g in range(2, 5):
            send(b, d, g, [(g * MiB, bytes([g]) * 4096)])
        leg = leg_for(tmp_path)
        await leg.cycle()
        send(b, d, 5, [(MiB, b"\x05" * 4096)])
        await leg.cycle()
        assert c_equals_b(tmp_path, d)
        assert ReplicaStore(str(tmp_path / "b")).remove(d)         # protection removed on B ...
        b = ReplicaStore(str(tmp_path / "b"))
        send(b, d, 1, [(0, b"\x31" * (3 * MiB))])                  # ... and enabled again: a new initial copy
        send(b, d, 2, [(6 * MiB, b"\x32" * 4096)])
        await leg.cycle()
        assert c_equals_b(tmp_path, d)
    asyncio.run(main())


def test_a_disk_adopted_after_the_leg_copied_it_empty_is_copied_again(tmp_path):
    """The leg copied B's replica while it was still empty (generation 0); then the operator adopted an
    existing disk for it (a restored backup): the image is replaced whole without a cycle, so no range is
    noted. C must not keep the empty copy under the primary's later cycles."""
    from replicator.vhdx import create_vhdx
    async def main():
        b = ReplicaStore(str(tmp_path / "b"))
        d = uuid.uuid4()
        b.ensure_disk(d, SIZE, block_size=MiB, machine="vm01")
        leg = leg_for(tmp_path)
        await leg.cycle()
        backup = str(tmp_path / "backup.vhdx")
        with create_vhdx(backup, SIZE, block_size=MiB) as v:
            v.write(2 * MiB, b"\x44" * MiB)
        ReplicaStore(str(tmp_path / "b")).adopt(d, backup, block_size=MiB, machine="vm01")
        b = ReplicaStore(str(tmp_path / "b"))
        send(b, d, 1, [(0, b"\x45" * 4096)])
        await leg.cycle()
        assert c_equals_b(tmp_path, d)
    asyncio.run(main())


def test_a_commit_under_way_when_the_leg_starts_is_noted_or_waited_for(tmp_path, monkeypatch):
    """The replica server's commit looked for the change journal just before the leg made it (so noted
    nothing) and is held there, before its journal is saved; the leg then reads B as it stands. Without a
    wait for that commit, its ranges were never noted and C missed them for good."""
    async def main():
        b = ReplicaStore(str(tmp_path / "b"))
        d = uuid.uuid4()
        send(b, d, 1, [(0, b"\x01" * MiB)])
        disk = b.disk(d)
        stream = upload(disk, d, 2, [(4 * MiB, b"\x02" * (2 * MiB))])
        held, release = threading.Event(), threading.Event()
        real_save = ReplicaDisk._save

        def save(self):
            if self.state.journal and not release.is_set():    # just after commit() looked for the journal
                held.set()
                release.wait(10)
            real_save(self)
        monkeypatch.setattr(ReplicaDisk, "_save", save)
        committer = threading.Thread(target=disk.commit, args=(stream,))
        committer.start()
        assert held.wait(10)
        timer = threading.Timer(1.0, release.set)
        timer.start()
        leg = leg_for(tmp_path)
        try:
            await leg.cycle()
        finally:
            release.set()
            committer.join(10)
            timer.cancel()
        await leg.cycle()
        assert ReplicaStore(str(tmp_path / "b")).disk(d).generation == 2
        assert c_equals_b(tmp_path, d)
    asyncio.run(main())


def test_folders_a_crash_left_in_the_store_are_not_disks_of_the_machine(tmp_path):
    """A replica removed on B is renamed to disks/.deleting-ID before its files go (a creation is made in
    disks/.new-ID): killed in between, the folder stays until the store sweeps it, state.json and all. The
    leg took it for a disk of the machine (and failed on its name, which is no disk id)."""
    async def main():
        b = ReplicaStore(str(tmp_path / "b"))
        d, gone = uuid.uuid4(), uuid.uuid4()
        send(b, d, 1, [(0, b"\x01" * MiB)])
        send(b, gone, 1, [(0, b"\x09" * MiB)])
        base = tmp_path / "b" / "disks"
        os.rename(base / str(gone), base / f".deleting-{gone}")          # remove() killed after its rename
        leg = leg_for(tmp_path)
        await leg.cycle()
        assert set(leg.data["disks"]) == {str(d)}
        assert c_equals_b(tmp_path, d)
    asyncio.run(main())


def test_a_cycle_rolled_back_while_the_leg_copied_the_disk_is_levelled(tmp_path, monkeypatch):
    """The initial copy reads B while the replica server applies a cycle; the apply fails half-way (here its
    spool is cut short under it) and is rolled back. The copy holds half of that cycle, noted under a
    generation B never reached: the levelling read took only generations up to B's, so C's point kept the
    half-applied data."""
    import replicator.daemon.extended as ext
    async def main():
        b = ReplicaStore(str(tmp_path / "b"))
        d = uuid.uuid4()
        send(b, d, 1, [(0, b"\x01" * MiB)])
        disk = b.disk(d)
        disk.set_retention(1)                           # undo logs: a failed apply is rolled back
        stream = upload(disk, d, 2, [(2 * MiB, os.urandom(MiB)), (4 * MiB, os.urandom(MiB))])
        spool = disk.spool_path(stream)
        real_save, real_roll_back, real_encode = ReplicaDisk._save, ReplicaDisk._roll_back, ext.encode_forward
        copied = {}

        def save(self):                                 # the apply begins: its spool is cut short under it
            if self.path == disk.path and self.state.journal and self.state.journal["phase"] == "apply":
                os.truncate(spool, os.path.getsize(spool) * 2 // 3)
            real_save(self)

        def roll_back(self, undo_path):                 # the copy reads the half-applied image just now
            copied["stats"] = real_encode(*copied["args"], **copied["kw"])
            real_roll_back(self, undo_path)

        def encode(*args, **kw):
            if kw.get("full"):
                copied["args"], copied["kw"] = args, kw
                with pytest.raises(Exception):
                    disk.commit(stream)
                return copied["stats"]
            return real_encode(*args, **kw)
        monkeypatch.setattr(ReplicaDisk, "_save", save)
        monkeypatch.setattr(ReplicaDisk, "_roll_back", roll_back)
        monkeypatch.setattr(ext, "encode_forward", encode)
        leg = leg_for(tmp_path)
        await leg.cycle()
        assert ReplicaStore(str(tmp_path / "b")).disk(d).generation == 1
        assert "stats" in copied
        assert c_equals_b(tmp_path, d)
    asyncio.run(main())


@pytest.mark.parametrize("text", ['{"disks": {"1f0e', '[1, 2]', '{"disks": {"%s": {"generation": "x"}}}',
                                  '{"disks": {"%s": {"generation": 1, "forwarded": 1, "pending": 7}}}',
                                  '{"disks": []}'])
def test_an_unreadable_leg_state_is_one_line_and_kept(tmp_path, text):
    """STATE_DIR/extended/NAME.json cut short or edited by hand: the leg says so in one line naming the
    file and refuses to cycle; the file is left as it is (it records what C holds), and the rest of the
    replica site starts (the leg was built with it: its error stopped replicatord, the primary leg too)."""
    async def main():
        b = ReplicaStore(str(tmp_path / "b"))
        d = uuid.uuid4()
        send(b, d, 1, [(0, b"\x01" * MiB)])
        path = tmp_path / "b-state" / "extended" / "vm01.json"
        path.parent.mkdir(parents=True)
        body = text.replace("%s", str(d))
        path.write_text(body)
        leg = leg_for(tmp_path)                              # does not raise: the other legs, the server start
        st = leg.status()
        assert st["state"] == "Error" and str(path) in st["reason"] and "\n" not in st["reason"]
        with pytest.raises(UsageError) as e:
            await leg.cycle()
        assert str(path) in e.value.message and "\n" not in e.value.message
        stop = asyncio.Event()
        stop.set()
        await leg.run(stop)
        assert path.read_text() == body
    asyncio.run(main())


def test_a_machine_name_two_trust_groups_use_in_one_root_is_not_merged(tmp_path):
    """Two tenants (trust groups) replicate into one storage root, each with a machine called vm01. The
    leg for vm01 took the disks of both and sent the other tenant's disk to its extended site. Without a
    trust_group it must refuse in one line; with one it forwards that group's disks only."""
    from replicator.transport.auth import AuthorizationEntry, Ownership

    async def main():
        b = ReplicaStore(str(tmp_path / "b"))
        mine, theirs = uuid.uuid4(), uuid.uuid4()
        send(b, mine, 1, [(0, b"\x01" * MiB)])
        send(b, theirs, 1, [(0, b"\x66" * MiB)])
        owners = Ownership(str(tmp_path / "b"))
        owners.claim(str(mine), AuthorizationEntry("primary1", str(tmp_path / "b"), "g1"))
        owners.claim(str(theirs), AuthorizationEntry("primary2", str(tmp_path / "b"), "g2"))
        leg = leg_for(tmp_path)
        with pytest.raises(UsageError) as e:
            await leg.cycle()
        assert "g1" in e.value.message and "g2" in e.value.message and "\n" not in e.value.message
        assert not (tmp_path / "c" / "disks" / str(theirs)).exists()
        settings = ExtendedSettings(machine="vm01", target=f"local://{tmp_path / 'c'}",
                                    storage=str(tmp_path / "b"), trust_group="g1")
        leg = ExtendedLeg(settings, open_target(settings.target, retries=1), str(tmp_path / "b-state"))
        await leg.cycle()
        assert set(leg.data["disks"]) == {str(mine)}
        assert not (tmp_path / "c" / "disks" / str(theirs)).exists()
        assert c_equals_b(tmp_path, mine)
    asyncio.run(main())


def test_a_disk_made_again_with_another_size_is_copied_once_removed_on_c(tmp_path):
    """B's replica made again under the same id at another size: C refuses the copy in one line (its disk
    is of the old size); once the operator removes it there, the next cycle copies it whole (it went on
    from the generation the leg had forwarded, which C no longer held, and failed forever)."""
    async def main():
        b = ReplicaStore(str(tmp_path / "b"))
        d = uuid.uuid4()
        for g in range(1, 4):
            send(b, d, g, [(g * MiB, bytes([g]) * 4096)])
        leg = leg_for(tmp_path)
        await leg.cycle()
        assert ReplicaStore(str(tmp_path / "b")).remove(d)
        b = ReplicaStore(str(tmp_path / "b"))
        bigger = b.ensure_disk(d, 2 * SIZE, block_size=MiB, machine="vm01")
        header = delta.StreamHeader(disk_id=d, disk_size=2 * SIZE, block_size=MiB, generation=1,
                                    base_generation=0, created=1.7e9)
        sink = io.BytesIO()
        with delta.DeltaEncoder(header, sink) as enc:
            enc.add_data(12 * MiB, b"\x77" * MiB)
            enc.finish()
        up = bigger.open_upload(str(uuid.uuid4()))
        up.write(0, sink.getvalue())
        up.sync()
        up.close()
        bigger.commit(os.path.basename(up.path)[:-len(".delta")])
        with pytest.raises(Exception) as e:
            await leg.cycle()
        assert "bytes" in str(getattr(e.value, "message", e.value))
        assert ReplicaStore(str(tmp_path / "c")).remove(d)             # the operator removes it on C
        await leg.cycle()
        assert c_equals_b(tmp_path, d)
    asyncio.run(main())


def test_a_machine_failed_over_on_the_extended_site_takes_no_more_forwarded_cycles(tmp_path):
    """Sites A and B lost, the machine failed over on C; then B comes back and its leg runs. The leg sends no
    fencing epoch and checks no failover (it makes no ensure_disk after the first copy): C's failed-over
    disk must refuse the commit, not move past the point it was failed over at."""
    async def main():
        b = ReplicaStore(str(tmp_path / "b"))
        d = uuid.uuid4()
        send(b, d, 1, [(0, b"\x01" * MiB)])
        leg = leg_for(tmp_path)
        await leg.cycle()
        c = ReplicaStore(str(tmp_path / "c")).disk(d)
        before = (c.generation, image_bytes(tmp_path / "c", d, tmp_path, "c")[1])
        c.set_failover({"machine": "vm01", "point": 1, "time": 1.0})
        send(b, d, 2, [(MiB, b"\x02" * MiB)])
        with pytest.raises(Exception) as e:
            await leg.cycle()
        assert "failed over" in str(getattr(e.value, "message", e.value))
        assert (ReplicaStore(str(tmp_path / "c")).disk(d).generation,
                image_bytes(tmp_path / "c", d, tmp_path, "c")[1]) == before
    asyncio.run(main())

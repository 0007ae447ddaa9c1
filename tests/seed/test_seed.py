"""Offline seeding: export while the primary keeps writing, import, continue replication; the replica ends
identical and the network carries only the changes since the cut. A corrupt volume is named, nothing moves."""
from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import threading

import pytest

from replicator.errors import FormatError, ResyncCancelled, SequenceError
from replicator.replica import ReplicaStore
from replicator.replication import DiskReplicator
from replicator.seed import export_machine, import_seed, verify_seed
from replicator.targets import LocalTarget
from replicator.tracking import TrackedDisk
from replicator.tracking.service import ExportService
from replicator.vhdx import VhdxDisk, create_vhdx

from ..externals import qemu_compare, tool

MiB = 1 << 20
SIZE = 96 * MiB


def make_primary(path):
    rng = random.Random(3)
    with create_vhdx(path, SIZE, block_size=2 * MiB) as d:
        for k in range(40):                              # 40 MiB of partly compressible data
            d.write(k * 2 * MiB, rng.randbytes(MiB // 2) + bytes([k]) * (MiB // 2))


def qemu_io(uri, *cmds):
    args = [tool("qemu-io"), "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [uri], check=True, capture_output=True)


def test_export_write_import_continue(tmp_path):
    primary = str(tmp_path / "vm.vhdx")
    make_primary(primary)
    tracker = TrackedDisk(primary)
    svc = ExportService({"vm": tracker}, socket_path=str(tmp_path / "s.sock")).start()
    media = str(tmp_path / "media")
    cancel = threading.Event()

    def export(stop_after_first=False):
        def progress(name, pos, size):
            if stop_after_first:
                cancel.set()

        async def run():
            return export_machine("vm01", {"vm": tracker}, media, volume_size=8 * MiB, cancel=cancel,
                                  progress=progress)
        return svc._call(run(), timeout=300)

    try:
        with pytest.raises(ResyncCancelled):
            export(stop_after_first=True)                 # interrupted after its first volume
        qemu_io(svc.uri("vm"), "write -P 0x61 1M 2M", "write -P 0x62 70M 1M")    # writes during the export
        cancel.clear()
        manifest = export()
        assert manifest.disks[0].complete and len(manifest.disks[0].volumes) >= 3
        qemu_io(svc.uri("vm"), "write -P 0x63 5M 512k", "write -z 30M 1M")     # writes after the export
        root = str(tmp_path / "replica")
        target = LocalTarget(root)
        asyncio.run(import_seed(os.path.join(media, "vm01"), target, machine="vm01"))
        rep = DiskReplicator(tracker, target)

        async def cycle():
            return await rep.run_cycle()
        result = svc._call(cycle(), timeout=120)
        assert result.kind == "delta"
        # only the changes since the cut crossed the network: 2 + 1 + 0.5 MiB of data (and a zeroing)
        assert result.plain_bytes <= 4 * MiB and result.bytes_sent < 4 * MiB, result
        snap = str(tmp_path / "at-cut.vhdx")

        async def copy():
            tracker.disk.flush()
            shutil.copy(primary, snap)
        svc._call(copy())
    finally:
        svc.stop()
    VhdxDisk.open(snap, read_only=False).close()
    replica = ReplicaStore(root).disk(manifest.disks[0].disk_id)
    cmp = qemu_compare(replica.image_path, snap, "vhdx", "vhdx")
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def _exported(tmp_path):
    primary = str(tmp_path / "vm.vhdx")
    make_primary(primary)
    tracker = TrackedDisk(primary)
    media = str(tmp_path / "media")
    manifest = export_machine("vm01", {"vm": tracker}, media, volume_size=8 * MiB)
    tracker.close()
    return os.path.join(media, "vm01"), manifest


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_a_damaged_volume_is_named_and_nothing_is_imported(tmp_path, damage):
    machine_dir, manifest = _exported(tmp_path)
    vol = manifest.disks[0].volumes[1]
    path = os.path.join(machine_dir, vol.file)
    if damage == "corrupt":
        with open(path, "r+b") as f:
            f.seek(vol.bytes // 2)
            b = f.read(1)
            f.seek(vol.bytes // 2)
            f.write(bytes([b[0] ^ 1]))
    elif damage == "truncate":
        os.truncate(path, vol.bytes - 10)
    else:
        os.unlink(path)
    with pytest.raises(FormatError, match=vol.file.replace("/", ".")):
        verify_seed(machine_dir)
    root = str(tmp_path / "replica")
    with pytest.raises(FormatError):
        asyncio.run(import_seed(machine_dir, LocalTarget(root)))
    assert ReplicaStore(root).disk_ids() == []            # nothing was built


def test_seed_of_another_machine_or_older_than_the_replica_is_refused(tmp_path):
    machine_dir, manifest = _exported(tmp_path)
    root = str(tmp_path / "replica")
    with pytest.raises(Exception, match="machine vm01"):
        asyncio.run(import_seed(machine_dir, LocalTarget(root), machine="other"))
    asyncio.run(import_seed(machine_dir, LocalTarget(root)))
    asyncio.run(import_seed(machine_dir, LocalTarget(root)))   # importing again changes nothing
    disk_id = manifest.disks[0].disk_id
    store = ReplicaStore(root)
    n = len(manifest.disks[0].volumes)
    assert store.disk(disk_id).generation == n
    # the replica moves on (a later cycle); the old seed must not be imported over it
    rd = store.disk(disk_id)
    rd.state.generation = n + 1                            # as if a cycle had been applied since
    rd.state.committed.append(["0" * 32, n + 1])
    rd._save()
    with pytest.raises(SequenceError, match="older"):
        asyncio.run(import_seed(machine_dir, LocalTarget(root)))


def test_from_existing_disk_sends_only_the_differences(tmp_path):
    """A disk already on the replica host (here: an older copy of the primary) becomes the replica; the
    first cycle is a checksum resync that moves only the blocks changed since that copy."""
    primary = str(tmp_path / "vm.vhdx")
    make_primary(primary)
    old_copy = str(tmp_path / "restored-backup.vhdx")
    shutil.copy(primary, old_copy)
    with VhdxDisk.open(primary, read_only=False) as d:          # the primary moved on since the backup
        d.write(7 * MiB, b"\x77" * (3 * 65536))
        d.write(60 * MiB + 100, b"\x78" * 1000)
        disk_id = d.virtual_disk_id
    root = str(tmp_path / "replica")
    from replicator.cli import main
    assert main(["seed", "import", "--replica-root", root, "--from-existing", old_copy,
                 "--disk-id", str(disk_id)]) == 0
    tracker = TrackedDisk(primary)
    try:
        result = asyncio.run(DiskReplicator(tracker, LocalTarget(root)).run_cycle())
    finally:
        tracker.close()
    assert result.kind == "resync"
    assert result.plain_bytes == 4 * 65536                      # three changed blocks, and one more
    with VhdxDisk.open(primary) as d:
        expected = d.read(0, SIZE)
    assert ReplicaStore(root).disk(disk_id).open_image().read(0, SIZE) == expected

"""End to end on one host: a real NBD client writes through the tracked export while cycles ship to a
replica store; after every cycle the replica equals the primary at the cut, byte for byte."""
from __future__ import annotations

import shutil
import subprocess

from replicator.replica import ReplicaStore
from replicator.replication import DiskReplicator
from replicator.targets import LocalTarget, Retry
from replicator.tracking import TrackedDisk
from replicator.tracking.service import ExportService
from replicator.vhdx import VhdxDisk, create_vhdx

from ..externals import qemu_compare, tool

MiB = 1 << 20


def qemu_io(uri: str, *cmds: str) -> None:
    args = [tool("qemu-io"), "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [uri], check=True, capture_output=True)


def snapshot(svc, tracked, path, out):
    """The primary as of a cut: flushed through the export, copied while no request runs."""
    async def copy():
        tracked.disk.flush()
        shutil.copy(path, out)
    svc._call(copy())
    VhdxDisk.open(out, read_only=False).close()     # the copy of an open image replays its log once


def test_cycles_keep_the_replica_equal_to_the_primary_at_every_cut(tmp_path):
    primary = str(tmp_path / "vm-disk.vhdx")
    with create_vhdx(primary, 64 * MiB, block_size=2 * MiB) as d:
        d.write(3 * MiB, b"\x5a" * (5 * MiB))            # data from before protection began
    tracked = TrackedDisk(primary)
    assert tracked.resync_required                       # first use: initial replication
    target = Retry(LocalTarget(str(tmp_path / "replica-root")))
    rep = DiskReplicator(tracked, target)
    svc = ExportService({"vm-disk": tracked}, socket_path=str(tmp_path / "nbd.sock")).start()
    uri = svc.uri("vm-disk")

    def cycle():
        async def run():
            return await rep.run_cycle()
        # the cycle runs on the export's loop: no request is in flight while it cuts and reads
        return svc._call(run(), timeout=120)

    try:
        first = cycle()
        assert first.kind == "initial" and first.streams == 2      # the initial copy, then the cut's log
        assert first.bytes_sent < 64 * 1024                         # 5 MiB of one byte value compresses away
        generation = first.generation
        workloads = [("write -P 0x11 0 1M", "write -P 0x22 10M 3M"),
                     ("write -z 3M 2M", "discard 12M 512k", "write -P 0x33 20M 64k"),
                     ("write -P 0x44 0 64M",),
                     ()]
        for k, cmds in enumerate(workloads):
            if cmds:
                qemu_io(uri, *cmds)
            at_cut = str(tmp_path / f"cut-{k}.vhdx")
            snapshot(svc, tracked, primary, at_cut)
            result = cycle()
            # rewriting the whole disk makes the log outgrow half the disk: Hyper-V's resync trigger
            expected = "resync" if k == 2 else "delta"
            assert result.kind == expected and result.generation > generation
            generation = result.generation
            replica = ReplicaStore(str(tmp_path / "replica-root")).disk(tracked.disk.virtual_disk_id)
            cmp = qemu_compare(replica.image_path, at_cut, "vhdx", "vhdx")
            assert cmp.returncode == 0, (k, cmp.stdout, cmp.stderr)
    finally:
        svc.stop()
    with VhdxDisk.open(primary) as d:
        assert d.read(0, MiB) == b"\x44" * MiB

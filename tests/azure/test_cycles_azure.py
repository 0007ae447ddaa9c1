"""End to end with the real cycle driver: a tracked VHDX written through its NBD export replicates to a page
blob on Azurite (initial, delta and resync cycles); after every cycle the blob's disk area equals the
primary at the cut, and the latest snapshot equals it too."""
from __future__ import annotations

import shutil
import subprocess

from replicator.azure import AzureTarget
from replicator.azure.meta import disk_area
from replicator.disk.vhd import parse_footer
from replicator.replication import DiskReplicator
from replicator.targets import Retry
from replicator.tracking import TrackedDisk
from replicator.tracking.service import ExportService
from replicator.vhdx import VhdxDisk, create_vhdx

from ..externals import tool
from .helpers import blob_bytes, container_name

MiB = 1 << 20


def qemu_io(uri: str, *cmds: str) -> None:
    args = [tool("qemu-io"), "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [uri], check=True, capture_output=True)


def primary_at_cut(svc, tracked, path, out) -> bytes:
    async def copy():
        tracked.disk.flush()
        shutil.copy(path, out)
    svc._call(copy())
    with VhdxDisk.open(out, read_only=False) as d:     # the copy of an open image replays its log once
        return d.read(0, d.size)


def test_cycles_keep_the_blob_equal_to_the_primary_at_every_cut(azurite, tmp_path):
    from azure.storage.blob.aio import ContainerClient

    primary = str(tmp_path / "vm-disk.vhdx")
    with create_vhdx(primary, 32 * MiB, block_size=2 * MiB) as d:
        d.write(3 * MiB, b"\x5a" * (5 * MiB))
    tracked = TrackedDisk(primary)
    container = ContainerClient.from_connection_string(azurite.connection_string, container_name("cyc"))
    azure = AzureTarget(container, retention=3, concurrency=4)
    rep = DiskReplicator(tracked, Retry(azure))
    svc = ExportService({"vm-disk": tracked}, socket_path=str(tmp_path / "nbd.sock")).start()
    uri = svc.uri("vm-disk")
    disk_id = tracked.disk.virtual_disk_id
    name = azure.blob_name(disk_id)

    def on_loop(coro):                   # the client lives on the export's loop, like the cycles
        return svc._call(coro, timeout=120)

    async def cycle():
        return await rep.run_cycle()

    try:
        on_loop(container.create_container())
        first = on_loop(cycle())
        assert first.kind == "initial" and first.generation >= 1
        workloads = [("write -P 0x11 0 1M", "write -P 0x22 10M 3M"),
                     ("write -z 3M 2M", "discard 12M 512k", "write -P 0x33 20M 64k", "write -P 0x7 1000 3000"),
                     ("write -P 0x44 0 32M",),
                     ()]
        for k, cmds in enumerate(workloads):
            if cmds:
                qemu_io(uri, *cmds)
            expected = primary_at_cut(svc, tracked, primary, str(tmp_path / f"cut-{k}.vhdx"))
            result = on_loop(cycle())
            data = on_loop(blob_bytes(container, name))
            assert data[:len(expected)] == expected, f"cycle {k} ({result.kind}): blob differs from the primary"
            parse_footer(data[disk_area(len(expected)):], 0, name)
            points = on_loop(azure.points(disk_id))
            assert points[-1].generation == result.generation
            snap = on_loop(blob_bytes(container, name, points[-1].snapshot))
            assert snap[:len(expected)] == expected
        on_loop(container.delete_container())
        on_loop(container.close())
    finally:
        svc.stop()

"""Issue 4 end to end, in both authentication modes: a primary VHDX written through the tracked export
by a real NBD client while cycles replicate it over the network; after every cycle the replica equals the
primary at the cut, and every retained recovery point materializes byte-identical to the primary then."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from replicator.replica import ReplicaStore
from replicator.replication import DiskReplicator
from replicator.targets import Retry
from replicator.targets.peer import PeerTarget
from replicator.tracking import TrackedDisk
from replicator.tracking.service import ExportService
from replicator.transport import AuthorizationEntry
from replicator.transport.server import ReplicaServer
from replicator.vhdx import VhdxDisk, create_vhdx

from ..externals import qemu_compare, tool
from .kdc import REALM

MiB = 1 << 20


def _target(mode, servers, pki, kdc, root):
    if mode == "cert":
        server = servers.cert([AuthorizationEntry("primary1", root)])
        p = pki.pair("primary1")
        return PeerTarget(server.url.replace("127.0.0.1", "localhost"), cert=p["cert"], key=p["key"], ca=p["ca"])
    server = servers.start(ReplicaServer([AuthorizationEntry(f"primary1@{REALM}", root)], mode="kerberos", port=0,
                                         keytab=kdc.path("server.keytab")))
    return PeerTarget(server.url.replace("127.0.0.1", "localhost"), kerberos=True, ccache=kdc.ccaches["primary1"])


@pytest.mark.parametrize("mode", ["cert", "kerberos"])
def test_cycles_over_the_network_keep_replica_and_points_exact(tmp_path, servers, pki, kdc, mode):
    root = str(tmp_path / "replica-root")
    primary = str(tmp_path / "vm.vhdx")
    with create_vhdx(primary, 48 * MiB, block_size=2 * MiB) as d:
        d.write(MiB, b"\x01" * (6 * MiB))
    tracker = TrackedDisk(primary)
    disk_id = tracker.disk.virtual_disk_id
    target = Retry(_target(mode, servers, pki, kdc, root))
    rep = DiskReplicator(tracker, target)
    svc = ExportService({"vm": tracker}, socket_path=str(tmp_path / "nbd.sock")).start()
    snaps = {}
    try:
        for k, cmds in enumerate([(), ("write -P 0x21 0 2M", "write -z 4M 1M"), ("write -P 0x22 30M 5M",),
                                  ("discard 0 1M", "write -P 0x23 47M 512k")]):
            if cmds:
                args = [tool("qemu-io"), "-f", "raw"] + [x for c in cmds for x in ("-c", c)] + [svc.uri("vm")]
                subprocess.run(args, check=True, capture_output=True)

            async def cycle():
                return await rep.run_cycle()
            result = svc._call(cycle(), timeout=300)
            snap = str(tmp_path / f"cut-{k}.vhdx")

            async def copy():
                tracker.disk.flush()
                shutil.copy(primary, snap)
            svc._call(copy())
            VhdxDisk.open(snap, read_only=False).close()
            snaps[result.generation] = snap
            rd = ReplicaStore(root).disk(disk_id)
            cmp = qemu_compare(rd.image_path, snap, "vhdx", "vhdx")
            assert cmp.returncode == 0, (mode, k, cmp.stdout, cmp.stderr)
    finally:
        svc.stop()
    rd = ReplicaStore(root).disk(disk_id)
    for point in rd.points:
        out = str(tmp_path / f"point-{point.generation}.vhdx")
        rd.materialize(point.generation, out)
        assert qemu_compare(out, snaps[point.generation], "vhdx", "vhdx").returncode == 0

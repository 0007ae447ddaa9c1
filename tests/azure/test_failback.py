"""Failback from Azure: minimize downtime (a pass while the Azure VM runs, then a final pass after it
stops that reads only what changed since and writes only differing blocks) and full download; the
on-premises VHDX ends equal to the Azure disk at the final snapshot. Azurite's page-range diff is not
real (it lists everything): the test holds whatever it lists, and a cleared range is levelled anyway."""
from __future__ import annotations

import argparse
import json
import os

import pytest

from replicator.azure import failback as fb
from replicator.azure import failover as fo
from replicator.azure.digests import BLOCK
from replicator.azure.azurite import DEV_ACCOUNT
from replicator.cli import azure as azure_cli
from replicator.errors import UsageError
from replicator.vhdx import VhdxDisk, create_vhdx

from .helpers import KiB, MiB, Primary, blob_bytes, new_container, run, target


def test_failback_minimize_downtime_and_full_download(azurite, tmp_path, capsys):
    async def go():
        c = await new_container(azurite)
        t = target(c)
        p = Primary(tmp_path, 8 * MiB, seed=71)
        p.scatter(20, aligned=True)
        await t.ensure_disk(p.disk_id, p.size, "sys", "vm7")
        sid, path = p.initial()
        await t.send(p.disk_id, sid, path)
        await t.commit(p.disk_id, sid)
        r = await fo.failover(t, p.disk_id)                  # the Azure VM's disk from here on
        vm_disk = c.get_blob_client(r.blob)

        local = create_vhdx(str(tmp_path / "sys.vhdx"), p.size)   # the on-premises copy, as it was left
        local.write(0, p.history[1])
        local.write(3 * MiB + 100, b"primary wrote this before it went down")   # one block diverged

        # the Azure VM runs and writes (2 blocks + 1 block), then the first pass copies what differs
        await vm_disk.upload_page(os.urandom(96 * KiB), offset=1 * MiB, length=96 * KiB)
        await vm_disk.upload_page(os.urandom(4 * KiB), offset=6 * MiB, length=4 * KiB)
        first = await fb.sync_pass(t, r.blob, local)
        s1 = (await blob_bytes(c, r.blob, first.snapshot))[:p.size]
        assert local.read(0, p.size) == s1
        assert first.blocks_written == 2 + 1 + 1 and first.bytes_written == 4 * BLOCK

        # it keeps running: one more write, and a trim of data it wrote before; then it stops
        await vm_disk.upload_page(os.urandom(8 * KiB), offset=5 * MiB, length=8 * KiB)
        await vm_disk.clear_page(offset=6 * MiB, length=64 * KiB)
        final = await fb.sync_pass(t, r.blob, local, base=first.snapshot)
        end = (await blob_bytes(c, r.blob))[:p.size]
        assert local.read(0, p.size) == end                  # identical to the Azure disk at the final cut
        assert final.blocks_written == 2 and final.bytes_written == 2 * BLOCK   # only what differed
        snaps = [b async for b in c.list_blobs(name_starts_with=r.blob, include=["snapshots"]) if b.snapshot]
        assert [b.snapshot for b in snaps] == [final.snapshot]     # the first pass's snapshot is gone
        await fb.finish(t, r.blob, final.snapshot)
        local.close()

        other = create_vhdx(str(tmp_path / "other.vhdx"), p.size + MiB)
        with pytest.raises(UsageError, match="not the same disk"):
            await fb.sync_pass(t, r.blob, other)
        other.close()
        await t.close()
        await c.close()
        return c.container_name, r.blob, end, p.size

    name, blob, end, size = run(go())
    create_vhdx(str(tmp_path / "fresh.vhdx"), size).close()         # full download into an empty disk (CLI)
    parser = argparse.ArgumentParser()
    azure_cli.register(parser.add_subparsers(dest="area"))
    url = f"azure://{DEV_ACCOUNT}/{name}?endpoint={azurite.account_url}"
    args = parser.parse_args(["azure", "failback", "--to", url, blob, "--disk", str(tmp_path / "fresh.vhdx"),
                              "--full", "--done", "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["bytes_written"] == size
    with VhdxDisk.open(str(tmp_path / "fresh.vhdx")) as fresh:
        assert fresh.read(0, size) == end
    args = parser.parse_args(["azure", "failback", "--to", url, blob, "--disk", str(tmp_path / "missing.vhdx")])
    with pytest.raises(UsageError, match="no such disk"):
        args.func(args)

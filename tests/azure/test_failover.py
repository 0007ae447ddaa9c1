"""Failover from Azure recovery points: points listed, a point copied to a new blob (a fixed VHD equal to
the primary at that point) and verified, test failover while replication continues, cleanup, the CLI."""
from __future__ import annotations

import argparse
import json

import pytest

from replicator import kernels
from replicator.azure import VerifyError
from replicator.azure import failover as fo
from replicator.azure.azurite import DEV_ACCOUNT
from replicator.azure.digests import sidecar_name
from replicator.azure.meta import disk_area
from replicator.cli import azure as azure_cli
from replicator.disk.vhd import FIXED, parse_footer
from replicator.errors import UsageError

from .helpers import MiB, Primary, blob_bytes, new_container, run, target


async def replicate(t, p: Primary, cycles: int) -> None:
    await t.ensure_disk(p.disk_id, p.size)
    for i in range(cycles):
        sid, path = p.initial() if p.generation == 0 else p.cycle()
        await t.send(p.disk_id, sid, path)
        await t.commit(p.disk_id, sid)


def test_failover_and_test_failover(azurite, tmp_path):
    async def go():
        c = await new_container(azurite)
        t = target(c, retention=5)
        p = Primary(tmp_path, 6 * MiB + 1024, seed=21)
        p.scatter(20)
        await replicate(t, p, 4)
        pts = await fo.list_points(t, p.disk_id)
        assert [x.generation for x in pts] == [1, 2, 3, 4]

        r = await fo.failover(t, p.disk_id, generation=2)
        assert r.generation == 2 and not r.test and r.blob.endswith("-failover-g2.vhd")
        data = await blob_bytes(c, r.blob)
        assert data[:p.size] == p.history[2]
        footer = parse_footer(data[disk_area(p.size):], disk_area(p.size), r.blob)
        assert footer.disk_type == FIXED
        with pytest.raises(UsageError, match="already exists"):
            await fo.failover(t, p.disk_id, generation=2)
        with pytest.raises(UsageError, match="no recovery point"):
            await fo.failover(t, p.disk_id, generation=99)

        tr = await fo.test_failover(t, p.disk_id)                 # the latest point
        assert tr.test and tr.generation == 4
        assert (await blob_bytes(c, tr.blob))[:p.size] == p.history[4]
        await replicate(t, p, 2)                                  # replication carries on
        assert (await blob_bytes(c, t.blob_name(p.disk_id)))[:p.size] == p.history[6]
        assert (await blob_bytes(c, tr.blob))[:p.size] == p.history[4]   # the test copy does not move
        assert await fo.test_blobs(t, p.disk_id) == [tr.blob]
        assert await fo.cleanup(t, p.disk_id) == [tr.blob]
        assert await fo.test_blobs(t, p.disk_id) == []
        names = [b.name async for b in c.list_blobs()]
        assert sorted(names) == sorted([t.blob_name(p.disk_id), sidecar_name(t, p.disk_id), r.blob])   # failover stays
        await t.close()
        await c.delete_container()
        await c.close()
    run(go())


def test_verify_catches_a_different_copy(azurite, tmp_path, monkeypatch):
    async def go():
        c = await new_container(azurite)
        t = target(c)
        p = Primary(tmp_path, 2 * MiB, seed=22)
        p.scatter(5)
        await replicate(t, p, 2)
        real = fo.blob_digest

        async def lying_digest(target_, blob, size, *rest):
            d = await real(target_, blob, size, *rest)
            return d if blob.snapshot else bytes(16)          # the copy "differs"
        monkeypatch.setattr(fo, "blob_digest", lying_digest)
        with pytest.raises(VerifyError, match="differs"):
            await fo.failover(t, p.disk_id)
        monkeypatch.setattr(fo, "blob_digest", real)
        assert [b.name async for b in c.list_blobs()] == sorted([t.blob_name(p.disk_id), sidecar_name(t, p.disk_id)])
        digest_a = await fo.blob_digest(t, c.get_blob_client(t.blob_name(p.disk_id)), 2 * MiB + 512)
        assert digest_a == kernels.xxh3_128(await blob_bytes(c, t.blob_name(p.disk_id)))
        await t.close()
        await c.delete_container()
        await c.close()
    run(go())


def test_cli(azurite, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("AZURE_STORAGE_KEY", raising=False)
    monkeypatch.delenv("AZURE_STORAGE_SAS_TOKEN", raising=False)
    p = Primary(tmp_path, 2 * MiB, seed=23)
    p.scatter(5)

    async def setup():
        c = await new_container(azurite)
        t = target(c)
        await replicate(t, p, 3)
        await t.close()
        await c.close()
        return c.container_name
    name = run(setup())
    url = f"azure://{DEV_ACCOUNT}/{name}?endpoint={azurite.account_url}"
    parser = argparse.ArgumentParser()
    azure_cli.register(parser.add_subparsers(dest="area"))

    def cli(*argv):
        args = parser.parse_args(["azure", *argv])
        assert args.func(args) == 0
        return capsys.readouterr().out

    out = cli("points", "--to", url, str(p.disk_id), "--json")
    assert [x["generation"] for x in json.loads(out)] == [1, 2, 3]
    assert "point      3" in cli("points", "--to", url, str(p.disk_id))
    res = json.loads(cli("test-failover", "--to", url, str(p.disk_id), "--generation", "2", "--json"))
    assert res["generation"] == 2 and res["test"]
    assert "-failover-g3.vhd" in cli("failover", "--to", url, str(p.disk_id))
    assert json.loads(cli("cleanup", "--to", url, str(p.disk_id), "--json"))["deleted"] == [res["blob"]]

"""The Azure target against Azurite: the target interface, blob == primary after every cycle, the VHD footer,
snapshots == primary at their time, retention, and uploading only non-zero ranges initially."""
from __future__ import annotations

import uuid

import pytest

from replicator.azure import AzureTarget
from replicator.azure.azurite import RequestCounter
from replicator.azure.meta import blob_size, disk_area
from replicator.disk.vhd import FIXED, parse_footer
from replicator.errors import SequenceError, UsageError
from replicator.targets import DiskInfo, PointInfo, Retry

from .helpers import KiB, MiB, Primary, blob_bytes, new_container, run, target


def test_interface_conformance(azurite, tmp_path):
    """ensure_disk, disk_info, send, commit, idempotent commit and send by stream id, sequence checks."""
    async def go():
        c = await new_container(azurite)
        t = target(c)
        p = Primary(tmp_path, 8 * MiB + 512)
        p.scatter(10)
        info = await t.ensure_disk(p.disk_id, p.size, "disk-a")
        assert isinstance(info, DiskInfo) and info == DiskInfo(str(p.disk_id), p.size, 0, ())
        assert await t.ensure_disk(p.disk_id, p.size, "disk-a") == info        # idempotent
        sid, path = p.initial()
        sent = await t.send(p.disk_id, sid, path)
        assert sent > 0
        point = await t.commit(p.disk_id, sid)
        assert isinstance(point, PointInfo) and point.generation == 1
        assert await t.commit(p.disk_id, sid) == point                        # commit again: same point
        assert await t.send(p.disk_id, sid, path) == 0                        # already applied: nothing sent
        info = await t.disk_info(p.disk_id)
        assert info.generation == 1 and sid in info.committed
        assert len(await t.points(p.disk_id)) == 1
        with pytest.raises(SequenceError):                                    # another size
            await t.ensure_disk(p.disk_id, p.size + 512)
        sid2, path2 = p.cycle()
        sid3, path3 = p.cycle()
        with pytest.raises(SequenceError):                                    # out of order: gen 3 on gen 1
            await t.send(p.disk_id, sid3, path3)
        with pytest.raises(SequenceError):                                    # nothing sent: no point
            await t.commit(p.disk_id, sid2)
        with pytest.raises(UsageError):
            await t.send(p.disk_id, "not/an id", path2)
        # the Retry decorator stacks around it like around every target
        r = Retry(t)
        await r.send(p.disk_id, sid2, path2)
        assert (await r.commit(p.disk_id, sid2)).generation == 2
        # protection removed with delete_replica_on_remove: the blob and its snapshots go
        assert await r.delete_disk(p.disk_id) is True
        assert [b async for b in c.list_blobs(include=["snapshots"])] == []
        assert await t.delete_disk(p.disk_id) is False
        await t.close()
        await c.delete_container()
        await c.close()
    run(go())


def test_blob_equals_primary_after_every_cycle(azurite, tmp_path):
    """Initial + delta cycles with unaligned writes, zeroed and trimmed ranges, on a disk whose size is not
    a multiple of 512: after each commit the blob's disk area is the primary, followed by a valid fixed VHD
    footer; every retained snapshot is the primary at its generation; retention keeps the newest 3."""
    async def go():
        c = await new_container(azurite)
        t = target(c, retention=3, checkpoint_bytes=256 * KiB)
        p = Primary(tmp_path, 24 * MiB + 300, seed=7)
        p.scatter(40)
        p.disk.write(p.size - 100, b"\xff" * 100)                # the very last (partial) sector
        await t.ensure_disk(p.disk_id, p.size)
        name = t.blob_name(p.disk_id)
        for i in range(6):
            sid, path = p.initial() if i == 0 else p.cycle(writes=10 + i, zeros=2, trims=2)
            await t.send(p.disk_id, sid, path)
            point = await t.commit(p.disk_id, sid)
            assert point.generation == p.generation
            data = await blob_bytes(c, name)
            assert len(data) == blob_size(p.size)
            assert data[:p.size] == p.history[p.generation], f"cycle {i}: blob differs from the primary"
            assert data[p.size:disk_area(p.size)] == bytes(disk_area(p.size) - p.size)
            footer = parse_footer(data[disk_area(p.size):], disk_area(p.size), name)
            assert footer.disk_type == FIXED and footer.current_size == disk_area(p.size)
        points = await t.points(p.disk_id)
        assert [pt.generation for pt in points] == [4, 5, 6]      # retention 3
        for pt in points:
            snap = await blob_bytes(c, name, pt.snapshot)
            assert snap[:p.size] == p.history[pt.generation], f"snapshot of generation {pt.generation} differs"
            assert pt.consistency in ("crash", "application")
        await t.close()
        await c.delete_container()
        await c.close()
    run(go())


def test_initial_upload_sends_only_nonzero_ranges(azurite, tmp_path):
    """A 64 MiB disk with ~3 MiB of data in scattered aligned pieces (with zero sectors inside data frames):
    the bytes on the wire stay within 5% of the non-zero data and the blob's page ranges skip the zeros."""
    async def go():
        counter = RequestCounter()
        c = await new_container(azurite, counter=counter)
        t = target(c)
        p = Primary(tmp_path, 64 * MiB, seed=3)
        for k in range(24):                                   # data with 4 KiB holes every 64 KiB
            off = k * 2 * MiB + 512 * k
            for j in range(0, 128 * KiB, 64 * KiB):
                p.disk.write(off + j, p.rng.randbytes(60 * KiB))
        nonzero = sum(1 for i in range(0, p.size, 512) if any(p.disk.buf[i:i + 512])) * 512
        await t.ensure_disk(p.disk_id, p.size)
        sid, path = p.initial()
        counter.reset()
        sent = await t.send(p.disk_id, sid, path)
        await t.commit(p.disk_id, sid)
        assert nonzero <= sent <= 1.05 * nonzero
        assert counter.body_bytes <= 1.05 * nonzero + 16 * KiB        # + metadata requests
        assert counter.by_op.get("PUT update", 0) <= 2 * 24
        blob = c.get_blob_client(t.blob_name(p.disk_id))
        covered = sum([r.end + 1 - r.start async for r in blob.list_page_ranges()])
        assert covered <= 1.05 * nonzero + 512                      # + the footer
        data = await blob_bytes(c, t.blob_name(p.disk_id))
        assert data[:p.size] == p.history[1]
        await t.close()
        await c.delete_container()
        await c.close()
    run(go())


def test_full_stream_onto_a_written_blob_clears_it_first(azurite, tmp_path):
    """A second full stream (the primary re-seeds) may omit zero ranges: the blob is cleared first, so
    data the new stream no longer has does not survive."""
    async def go():
        c = await new_container(azurite)
        t = target(c)
        p = Primary(tmp_path, 8 * MiB, seed=5)
        p.scatter(12, aligned=True)
        await t.ensure_disk(p.disk_id, p.size)
        sid, path = p.initial()
        await t.send(p.disk_id, sid, path)
        await t.commit(p.disk_id, sid)
        p.disk.write_zeroes(0, p.size)
        p.scatter(3, aligned=True)
        sid2, path2 = p.initial()
        await t.send(p.disk_id, sid2, path2)
        await t.commit(p.disk_id, sid2)
        assert (await blob_bytes(c, t.blob_name(p.disk_id)))[:p.size] == p.history[2]
        await t.close()
        await c.delete_container()
        await c.close()
    run(go())


def test_url_and_config_sources(azurite, tmp_path, monkeypatch):
    """azure:// URL with the endpoint and the dev key from the environment; an account URL with a SAS."""
    from datetime import datetime, timedelta, timezone

    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

    from replicator.azure import from_account_url, open_target
    from replicator.azure.azurite import DEV_ACCOUNT, DEV_KEY

    async def go():
        c = await new_container(azurite, tag="url")
        monkeypatch.setenv("AZURE_STORAGE_KEY", DEV_KEY)
        monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
        t = open_target(f"azure://{DEV_ACCOUNT}/{c.container_name}/vm1?endpoint={azurite.account_url}&retention=2")
        p = Primary(tmp_path, 2 * MiB)
        p.scatter(4)
        await t.ensure_disk(p.disk_id, p.size)
        assert t.retention == 2 and t.blob_name(p.disk_id).startswith("vm1/")
        sid, path = p.initial()
        await t.send(p.disk_id, sid, path)
        await t.commit(p.disk_id, sid)
        await t.close()
        sas = generate_account_sas(DEV_ACCOUNT, DEV_KEY, ResourceTypes(container=True, object=True),
                                   AccountSasPermissions(read=True, write=True, delete=True, list=True, add=True,
                                                         create=True), datetime.now(timezone.utc) + timedelta(hours=1))
        cfg = from_account_url(azurite.account_url, c.container_name, sas=sas, prefix="vm1")
        t2 = AzureTarget(cfg)
        assert (await t2.disk_info(p.disk_id)).generation == 1
        sid2, path2 = p.cycle()
        await t2.send(p.disk_id, sid2, path2)
        await t2.commit(p.disk_id, sid2)
        assert (await blob_bytes(c, t2.blob_name(p.disk_id)))[:p.size] == p.history[2]
        await t2.close()
        await c.delete_container()
        await c.close()
    run(go())


def test_parse_azure_url():
    from replicator.azure import parse_azure_url
    cfg = parse_azure_url("azure://acct123/cont-a/vms/x?sv=2024&sig=abc%2F&retention=5&concurrency=3", env={})
    assert (cfg.account, cfg.container, cfg.prefix) == ("acct123", "cont-a", "vms/x")
    assert cfg.account_url == "https://acct123.blob.core.windows.net"
    assert cfg.options == {"retention": 5, "concurrency": 3}
    assert "sig=abc%2F" in cfg.sas and "retention" not in cfg.sas
    assert "abc" not in cfg.describe()
    env = {"AZURE_STORAGE_CONNECTION_STRING": "DefaultEndpointsProtocol=https;AccountName=acct123;AccountKey=a2V5;"
                                              "EndpointSuffix=core.windows.net"}
    assert parse_azure_url("azure://acct123/cont", env=env).connection_string == env["AZURE_STORAGE_CONNECTION_STRING"]
    assert parse_azure_url("azure://-/cont", env=env).account == "acct123"
    assert parse_azure_url("azure://other9/cont", env={"AZURE_STORAGE_SAS_TOKEN": "?sv=1&sig=x"}).sas == "sv=1&sig=x"
    for bad in ("azure://acct123", "s3://a/b", "azure://UPPER/cont", "azure://acct123/ab",
                "azure://acct123/c?retention=x", "azure://-/cont"):
        with pytest.raises(UsageError):
            parse_azure_url(bad, env={})


def test_writer_id_is_stable_and_a_uuid(azurite):
    async def go():
        c = await new_container(azurite, create=False)
        a, b = AzureTarget(c), AzureTarget(c)
        assert a.writer_id == b.writer_id and uuid.UUID(a.writer_id)
        assert AzureTarget(c, writer_id=str(uuid.UUID(int=5))).writer_id != a.writer_id
        await c.close()
    run(go())

"""Stored data encrypted with the customer's key (azure/crypto.py): the blob and its snapshots hold no
plaintext (read with the plain SDK), failover, test failover and export decrypt byte-identical to the
primary, a wrong or missing key is refused before anything is written, the metadata names the key
without holding it, and a key rotation re-encrypts the blob while older points stay readable."""
from __future__ import annotations

import os

import pytest

from replicator import kernels
from replicator.azure import failover as fo
from replicator.azure.crypto import DiskCipher, KeyRing, WrongKey, new_key_line
from replicator.azure.digests import BLOCK
from replicator.azure.export import export_point
from replicator.azure.meta import disk_area, fields

from .helpers import MiB, Primary, blob_bytes, new_container, run, target

MARK = b"replicator azure page blob "


def key_file(path, *lines: str) -> str:
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def test_sector_cipher_round_trip_and_zero_sectors():
    master = bytes(range(32))
    c = DiskCipher(master, "id", "6f1c1e2a-0000-4000-8000-000000000001")
    plain = (MARK * 200)[:4096] + bytes(1024) + os.urandom(512)
    enc = c.encrypt(1 << 20, plain)
    assert len(enc) == len(plain) and MARK not in enc
    assert enc[4096:5120] == bytes(1024)                      # zero sectors stay zero (sparse blobs)
    assert c.decrypt(1 << 20, enc) == plain
    assert c.decrypt(1 << 20, enc[:512]) == plain[:512]      # any sector decrypts on its own
    assert c.encrypt(0, plain[:512]) != enc[:512]             # the tweak is the sector number
    other = DiskCipher(master, "id", "6f1c1e2a-0000-4000-8000-000000000002")
    assert other.encrypt(1 << 20, plain) != enc and other.check != c.check   # a key per disk
    with pytest.raises(ValueError):
        c.encrypt(100, plain)


def test_encrypted_replica_failover_export_and_wrong_keys(azurite, tmp_path):
    good = key_file(tmp_path / "good.key", new_key_line())
    bad = key_file(tmp_path / "bad.key", new_key_line())

    async def go():
        c = await new_container(azurite)
        t = target(c, key_file=good)
        p = Primary(tmp_path, 4 * MiB + 512, seed=41)
        p.scatter(12)
        await t.ensure_disk(p.disk_id, p.size, "sys", "vm-enc")
        for k in range(3):
            sid, path = p.initial() if p.generation == 0 else p.cycle()
            await t.send(p.disk_id, sid, path)
            await t.commit(p.disk_id, sid)
            await t.checkpoint(p.disk_id, p.generation, p.generation, False, 1)
        name = t.blob_name(p.disk_id)
        raw = await blob_bytes(c, name)                         # what Azure holds, read with the plain SDK
        assert MARK in p.history[3] and MARK not in raw
        assert raw[:p.size] != p.history[3]
        props = await c.get_blob_client(name).get_blob_properties()
        meta = fields(props.metadata)
        ring = KeyRing.load(good)
        assert meta["key_id"] == ring.current_id and meta["key_check"] == ring.cipher(p.disk_id).check
        assert ring.keys[0].hex() not in str(props.metadata)    # the key itself is nowhere in the metadata
        for pt in await t.points(p.disk_id):
            snap = await blob_bytes(c, name, pt.snapshot)
            assert MARK not in snap and pt.key_id == ring.current_id

        r = await fo.failover(t, p.disk_id)                     # decrypted into the new blob, verified
        assert (await blob_bytes(c, r.blob))[:p.size] == p.history[3]
        tr = await fo.test_failover(t, p.disk_id, generation=2)
        assert (await blob_bytes(c, tr.blob))[:p.size] == p.history[2]
        out = tmp_path / "export"
        os.mkdir(out)
        _, paths = await export_point(t, "vm-enc", None, str(out))
        with open(paths[0], "rb") as f:
            data = f.read()
        assert data[:p.size] == p.history[3] and len(data) == disk_area(p.size) + 512

        before = sorted([b.name async for b in c.list_blobs()])
        wrong, none = target(c, key_file=bad), target(c)
        for who in (wrong, none):
            with pytest.raises(WrongKey, match="encrypted with key"):
                await fo.failover(who, p.disk_id, dest="should-not-exist.vhd")
            with pytest.raises(WrongKey, match="encrypted with key"):
                await who.ensure_disk(p.disk_id, p.size, "sys", "vm-enc")
            with pytest.raises(WrongKey, match="encrypted with key"):
                await export_point(who, "vm-enc", None, str(tmp_path))
        assert sorted([b.name async for b in c.list_blobs()]) == before      # nothing was written
        assert os.listdir(tmp_path / "export") == ["sys.vhd"]
        assert (await blob_bytes(c, name)) == raw

        plain = target(c, prefix="clear")                        # an unencrypted replica cannot turn encrypted
        await plain.ensure_disk(p.disk_id, p.size)
        sid, path = Primary(tmp_path, p.size, disk_id=p.disk_id).initial()
        await plain.send(p.disk_id, sid, path)
        await plain.commit(p.disk_id, sid)
        with pytest.raises(Exception, match="stored in the clear"):
            await target(c, prefix="clear", key_file=good).ensure_disk(p.disk_id, p.size)
        for x in (t, wrong, none, plain):
            await x.close()
        await c.delete_container()
        await c.close()
    run(go())


def test_a_cycle_after_key_rotation(azurite, tmp_path):
    """`keygen --rotate`: the blob is re-encrypted under the new key at the next ensure_disk, cycles go on,
    old points stay readable with the old key kept in the file (and not without it)."""
    old_line, new_line = new_key_line(), new_key_line()
    first = key_file(tmp_path / "k1.key", old_line)
    rotated = key_file(tmp_path / "k2.key", new_line, old_line)
    only_new = key_file(tmp_path / "k3.key", new_line)

    async def go():
        c = await new_container(azurite)
        t = target(c, key_file=first)
        p = Primary(tmp_path, 3 * MiB, seed=43)
        p.scatter(10)
        await t.ensure_disk(p.disk_id, p.size)
        for _ in range(2):
            sid, path = p.initial() if p.generation == 0 else p.cycle()
            await t.send(p.disk_id, sid, path)
            await t.commit(p.disk_id, sid)
        await t.close()
        t2 = target(c, key_file=rotated)
        await t2.ensure_disk(p.disk_id, p.size)                     # re-encrypts under the new key
        ring = KeyRing.load(rotated)
        state = await t2._read_state(p.disk_id)
        assert state.key_id == ring.ids[0] and not state.rekey_from
        sid, path = p.cycle()
        await t2.send(p.disk_id, sid, path)
        await t2.commit(p.disk_id, sid)
        raw = await blob_bytes(c, t2.blob_name(p.disk_id))
        assert MARK in p.history[3] and MARK not in raw
        assert (await t2.digests(p.disk_id, BLOCK) == kernels.xxh3_128_blocks(p.history[3], BLOCK)).all()
        pts = await t2.points(p.disk_id)
        assert [x.key_id for x in pts][-1] == ring.ids[0] and ring.ids[1] in [x.key_id for x in pts]
        for x in pts:                                               # old and new points decrypt
            r = await fo.failover(t2, p.disk_id, generation=x.generation, dest=f"fo-{x.generation}.vhd")
            assert (await blob_bytes(c, r.blob))[:p.size] == p.history[x.generation]
        t3 = target(c, key_file=only_new)                           # the old key dropped: old points unreadable
        with pytest.raises(WrongKey, match="encrypted with key"):
            await fo.failover(t3, p.disk_id, generation=pts[0].generation, dest="never.vhd")
        for x in (t2, t3):
            await x.close()
        await c.delete_container()
        await c.close()
    run(go())

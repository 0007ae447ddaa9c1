"""Checksum resync against Azure: the digest sidecar follows every cycle (encrypted replicas too), so
after an unclean stop the primary compares digests and ships only the blocks that differ -- the bytes
sent are measured against the divergence; a sidecar in doubt is rebuilt from the blob's pages."""
from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid

import numpy as np

from replicator import delta, kernels
from replicator.azure.crypto import new_key_line
from replicator.azure.digests import BLOCK, sidecar_name
from replicator.azure.meta import PREFIX

from .helpers import KiB, MiB, Primary, blob_bytes, new_container, run, target


def truth(p: Primary) -> np.ndarray:
    return kernels.xxh3_128_blocks(bytes(p.disk.buf), BLOCK)


def resync_stream(p: Primary, theirs: np.ndarray) -> tuple[str, str, int]:
    """What the cycle driver does: the blocks whose digests differ, as one resync stream."""
    differ = np.flatnonzero((truth(p) != theirs).any(axis=1))
    extents = [(int(b) * BLOCK, min(BLOCK, p.size - int(b) * BLOCK)) for b in differ]
    sid = uuid.uuid4().hex
    path = os.path.join(p.tmp, f"{sid}.delta")
    header = delta.StreamHeader(p.disk_id, p.size, block_size=256 * KiB, generation=p.generation + 1,
                                base_generation=p.generation, created=time.time(), kind="resync",
                                consistency="crash")
    with open(path, "wb") as sink:
        delta.encode_extents(p.disk, extents, header, sink)
    p.generation += 1
    p.history[p.generation] = bytes(p.disk.buf)
    return sid, path, len(differ)


def scenario(azurite, tmp_path, key_file: str | None):
    async def go():
        c = await new_container(azurite)
        t = target(c, key_file=key_file)
        p = Primary(tmp_path, 16 * MiB + 1024, seed=51)
        p.scatter(30)
        await t.ensure_disk(p.disk_id, p.size)
        for _ in range(4):                       # initial, then cycles with unaligned writes, zeros, trims
            sid, path = p.initial() if p.generation == 0 else p.cycle()
            await t.send(p.disk_id, sid, path)
            await t.commit(p.disk_id, sid)
            assert np.array_equal(await t.digests(p.disk_id, BLOCK), truth(p))     # the sidecar follows
        assert await t.digests(p.disk_id, 4096) is None

        # unclean stop: the primary's disk took writes no stream carried (three small scattered ranges)
        divergence = 0
        for off, n in ((100 * KiB + 7, 3000), (5 * MiB, 20 * KiB), (16 * MiB + 1000, 24)):
            p.disk.write(off, os.urandom(n))
            divergence += n
        theirs = await t.digests(p.disk_id, BLOCK)
        sid, path, blocks = resync_stream(p, theirs)
        assert blocks == 3
        await t.send(p.disk_id, sid, path)
        await t.commit(p.disk_id, sid)
        sent = t.last_send.bytes_put
        assert divergence <= sent <= blocks * BLOCK, (sent, divergence)        # the blocks, not the disk
        assert (await blob_bytes(c, t.blob_name(p.disk_id)))[:p.size] == p.history[p.generation] or key_file
        assert np.array_equal(await t.digests(p.disk_id, BLOCK), truth(p))

        # in doubt (a lost sidecar update): rebuilt from the blob's pages, then trusted again
        side = c.get_blob_client(sidecar_name(t, p.disk_id))
        await side.set_blob_metadata({PREFIX + "digests_of": ""})
        assert np.array_equal(await t.digests(p.disk_id, BLOCK), truth(p))
        assert (await side.get_blob_properties()).metadata[PREFIX + "digests_of"]
        raw = await blob_bytes(c, side.blob_name)
        plain = truth(p).astype("<u8").tobytes()
        if key_file:
            assert plain[:4096] not in raw and raw[:64] != plain[:64]
        await t.close()
        await c.delete_container()
        await c.close()
        return sent, divergence
    return run(go())


def test_resync_ships_only_differing_blocks(azurite, tmp_path):
    sent, divergence = scenario(azurite, tmp_path, None)
    print(f"resync after {divergence} bytes of divergence sent {sent} bytes (disk 16 MiB)")


def test_resync_with_an_encrypted_replica(azurite, tmp_path):
    key = tmp_path / "k.key"
    key.write_text(new_key_line() + "\n")
    scenario(azurite, tmp_path, str(key))


def test_resync_after_a_killed_upload_keeps_what_azure_holds(azurite, tmp_path):
    """A send killed midway leaves part of a cycle on the blob; the resync after the restart compares
    against the blob as it is and sends only what the dead send did not deliver, and the blob ends equal
    to the primary (nothing the dead send wrote is undone and then skipped)."""
    async def go():
        c = await new_container(azurite)
        t = target(c, checkpoint_bytes=256 * KiB)
        p = Primary(tmp_path, 20 * MiB, seed=53)
        p.scatter(10)
        await t.ensure_disk(p.disk_id, p.size)
        for _ in range(2):
            sid, path = p.initial() if p.generation == 0 else p.cycle()
            await t.send(p.disk_id, sid, path)
            await t.commit(p.disk_id, sid)
        p.disk.write(1 * MiB, os.urandom(16 * MiB))                          # a big cycle, killed midway
        sid, path = p._emit("delta", lambda enc: enc.add_data(1 * MiB, bytes(p.disk.buf[1 * MiB:17 * MiB])))

        async def slow(n):                                                   # a slow link: time to kill it
            await asyncio.sleep(0.3)
        task = asyncio.create_task(t.send(p.disk_id, sid, path, throttle=slow))
        while not task.done():
            state = await t._read_state(p.disk_id)
            if state.ip is not None and state.ip.frames_done > 0:
                task.cancel()
                break
            await asyncio.sleep(0.01)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        state = await t._read_state(p.disk_id)
        assert state.ip is not None and not state.ip.complete, "the send finished before it could be killed"
        held = state.ip.bytes_done
        p.generation -= 1                                    # the primary never saw that cycle committed
        theirs = await t.digests(p.disk_id, BLOCK)
        sid, path, blocks = resync_stream(p, theirs)
        await t.send(p.disk_id, sid, path)
        await t.commit(p.disk_id, sid)
        assert (await blob_bytes(c, t.blob_name(p.disk_id)))[:p.size] == bytes(p.disk.buf)
        sent = t.last_send.bytes_put
        assert 0 < held and sent <= 16 * MiB - held + 4 * MiB, (sent, held)   # not what Azure held
        assert np.array_equal(await t.digests(p.disk_id, BLOCK), truth(p))    # in doubt: rebuilt, right
        await t.close()
        await c.delete_container()
        await c.close()
    run(go())

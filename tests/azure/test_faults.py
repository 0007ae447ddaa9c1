"""Faults against the Azure target: throttling (503 from a proxy) is retried; a killed or failed upload
resumes and sends only what was missing; wrong credentials, a missing container, another writer and an
oversized disk give clear errors; no recovery point is ever made from a partial cycle."""
from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from azure.core.exceptions import ResourceNotFoundError

from replicator.azure import AzureAuthError, BlobTooLarge, ContainerMissing, WriterConflict
from replicator.azure.azurite import RequestCounter
from replicator.azure.digests import BLOCK
from replicator.azure.meta import BlobState
from replicator.delta import DeltaFormatError
from replicator.errors import SequenceError
from replicator.targets import TargetUnavailable

from .helpers import KiB, MiB, Primary, blob_bytes, new_container, other_client, run, target
from .proxy import FaultProxy, is_put_page


FRAME = 256 * KiB          # Primary's stream block size: a frame of random data is this many page bytes


async def cancel_when(task: asyncio.Task, counter: RequestCounter, nbytes: int) -> None:
    """Cancel `task` (a kill, as far as the blob can tell) once `nbytes` went out."""
    while counter.body_bytes < nbytes and not task.done():
        await asyncio.sleep(0.002)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def blob_state(t, disk_id) -> BlobState:
    props = await t.blob(disk_id).get_blob_properties()
    return BlobState.from_metadata(props.metadata, "test")


def test_throttling_is_retried_and_slows_down(azurite, tmp_path):
    async def go():
        proxy = await FaultProxy(f"http://127.0.0.1:{azurite.port}").start()
        c = await new_container(azurite, conn=proxy.connection_string)
        t = target(c, concurrency=8)
        p = Primary(tmp_path, 16 * MiB, seed=11)
        p.scatter(30)
        await t.ensure_disk(p.disk_id, p.size)
        puts = [0]

        def every_third_put(request):
            if is_put_page(request) and ".digests" not in request.path:     # the replica's pages, not the sidecar
                puts[0] += 1
                return 503 if puts[0] % 3 == 0 and puts[0] < 40 else None
        proxy.rule = every_third_put
        sid, path = p.initial()
        await t.send(p.disk_id, sid, path)
        await t.commit(p.disk_id, sid)
        assert proxy.faults > 0 and t.last_send.retries >= proxy.faults
        assert t.last_send.window_cuts >= 1
        assert (await blob_bytes(c, t.blob_name(p.disk_id)))[:p.size] == p.history[1]
        await t.close()
        await c.close()
        await proxy.stop()
    run(go())


def test_killed_upload_resumes_and_sends_only_the_rest(azurite, tmp_path):
    """Cancel send() halfway through a 64 MiB initial upload; the blob's metadata says how far it got; a
    new target (a restarted primary) sends only the rest, and no point exists before the commit."""
    async def go():
        counter = RequestCounter()
        c = await new_container(azurite, counter=counter)
        t = target(c, concurrency=2, checkpoint_bytes=1 * MiB)
        p = Primary(tmp_path, 64 * MiB, seed=2)
        p.disk.write(0, p.rng.randbytes(p.size))                # every sector non-zero: all of it must go
        await t.ensure_disk(p.disk_id, p.size)
        sid, path = p.initial()
        counter.reset()
        await cancel_when(asyncio.create_task(t.send(p.disk_id, sid, path)), counter, 32 * MiB)
        first = counter.body_bytes
        state = await blob_state(t, p.disk_id)
        assert state.ip is not None and state.ip.stream == sid and not state.ip.complete
        assert state.ip.frames_done > 0 and state.ip.bytes_done >= state.ip.frames_done * FRAME
        assert await t.points(p.disk_id) == []
        with pytest.raises(SequenceError):                        # a partial cycle never becomes a point
            await t.commit(p.disk_id, sid)
        assert await t.points(p.disk_id) == []
        await c.close()

        counter2 = RequestCounter()
        c2 = other_client(azurite, c, counter=counter2)
        t2 = target(c2, concurrency=2)                            # same host: same writer, its lease
        sent = await t2.send(p.disk_id, sid, path)
        # a checkpoint the cancelled send had in flight may still land after we read the state (the service
        # finishes a request whose client went away): never less than what we read, and exactly what it says
        resumed = t2.last_send.resumed_at
        assert resumed >= state.ip.frames_done and resumed * FRAME <= first
        missing = p.size - resumed * FRAME                       # frames the blob had not acknowledged
        sidecar = p.size // BLOCK * 16                            # the digest sidecar: one row per 64 KiB block
        assert sent == missing and counter2.body_bytes == missing + sidecar  # exactly those, nothing else
        assert first - (p.size - missing) <= 4 * 4 * MiB            # resent: in flight + checkpoint lag
        await t2.commit(p.disk_id, sid)
        assert (await blob_bytes(c2, t2.blob_name(p.disk_id)))[:p.size] == p.history[1]
        assert len(await t2.points(p.disk_id)) == 1
        await t2.close()
        await c2.close()
    run(go())


def test_failed_upload_raises_retryable_then_resumes(azurite, tmp_path):
    """The service keeps failing (503, dropped connections) past the retries: TargetUnavailable, no point;
    once it recovers, the next send continues from the recorded progress."""
    async def go():
        proxy = await FaultProxy(f"http://127.0.0.1:{azurite.port}").start()
        c = await new_container(azurite, conn=proxy.connection_string)
        t = target(c, concurrency=2, attempts=2, checkpoint_bytes=512 << 10)
        p = Primary(tmp_path, 32 * MiB, seed=4)
        p.disk.write(0, p.rng.randbytes(p.size))
        await t.ensure_disk(p.disk_id, p.size)
        puts = [0]

        def die_after_four(request):
            if is_put_page(request):
                puts[0] += 1
                if puts[0] > 4:
                    return "drop" if puts[0] % 2 else 503
        proxy.rule = die_after_four
        sid, path = p.initial()
        with pytest.raises(TargetUnavailable):
            await t.send(p.disk_id, sid, path)
        with pytest.raises(SequenceError):
            await t.commit(p.disk_id, sid)
        assert await t.points(p.disk_id) == []
        done = (await blob_state(t, p.disk_id)).ip.frames_done
        assert done > 0
        proxy.rule = None
        sent = await t.send(p.disk_id, sid, path)
        assert t.last_send.resumed_at == done and sent <= p.size - 4 * MiB + 2 * 4 * MiB
        await t.commit(p.disk_id, sid)
        assert (await blob_bytes(c, t.blob_name(p.disk_id)))[:p.size] == p.history[1]
        await t.close()
        await c.close()
        await proxy.stop()
    run(go())


def test_abandoned_stream_is_undone_before_another(azurite, tmp_path):
    """A delta stream left half-applied and then replaced by a different stream on the same base (the
    primary re-encoded the cycle): the blob goes back to the last point before the new stream applies."""
    async def go():
        counter = RequestCounter()
        c = await new_container(azurite, counter=counter)
        t = target(c, concurrency=2)
        p = Primary(tmp_path, 32 * MiB, seed=9)
        p.scatter(10)
        await t.ensure_disk(p.disk_id, p.size)
        sid, path = p.initial()
        await t.send(p.disk_id, sid, path)
        await t.commit(p.disk_id, sid)
        sid1, path1 = p.cycle(writes=60, zeros=0, trims=0, max_len=1 * MiB)
        counter.reset()
        await cancel_when(asyncio.create_task(t.send(p.disk_id, sid1, path1)), counter, 6 * MiB)
        p.undo_last()
        sid2, path2 = p.cycle(writes=3, zeros=1, trims=1)
        await t.send(p.disk_id, sid2, path2)
        await t.commit(p.disk_id, sid2)
        assert (await blob_bytes(c, t.blob_name(p.disk_id)))[:p.size] == p.history[2]
        await t.close()
        await c.close()
    run(go())


def test_wrong_credentials(azurite, tmp_path):
    async def go():
        c = await new_container(azurite)
        bad = azurite.connection_string.replace("AccountKey=Eby8", "AccountKey=Xby8")
        cb = await new_container(azurite, create=False, conn=bad)
        t = target(cb)
        with pytest.raises(AzureAuthError, match="rejected the credentials"):
            await t.ensure_disk(uuid.uuid4(), 1 * MiB)
        await cb.close()
        await c.close()
    run(go())


def test_missing_container_is_created_for_a_new_replica(azurite, tmp_path):
    """As azcopy does: the first writer creates the container; two writers at once both succeed; reading
    from a container that is not there stays an error (nothing is created by a reader)."""
    async def go():
        c = await new_container(azurite, create=False)
        t = target(c)
        with pytest.raises(ContainerMissing, match="container does not exist"):
            await t.disk_info(uuid.uuid4())
        with pytest.raises(ContainerMissing):
            await t.points(uuid.uuid4())
        with pytest.raises(ResourceNotFoundError):     # the readers above made nothing
            await c.get_container_properties()
        a, b = uuid.uuid4(), uuid.uuid4()
        infos = await asyncio.gather(t.ensure_disk(a, 1 * MiB), target(other_client(azurite, c)).ensure_disk(b, 2 * MiB))
        assert [i.generation for i in infos] == [0, 0]
        props = await c.get_container_properties()
        assert props.public_access is None                     # private, as replicas must be
        assert (await t.disk_info(b)).size == 2 * MiB
        await c.close()
    run(go())


def test_disk_larger_than_page_blob_limit(azurite):
    async def go():
        c = await new_container(azurite)
        t = target(c)
        disk_id = uuid.uuid4()
        with pytest.raises(BlobTooLarge, match="8 TiB"):
            await t.ensure_disk(disk_id, 8 << 40)                 # + the footer: one sector too many
        assert [b async for b in c.list_blobs()] == []
        await t.ensure_disk(disk_id, (8 << 40) - 512)              # the largest that fits
        await c.delete_container()
        await c.close()
    run(go())


def test_another_writer_is_refused(azurite, tmp_path):
    """A second writer (another host: another writer id) cannot take the blob, nor write to it; a lease
    broken behind the writer's back stops it mid-send with no point made."""
    async def go():
        c = await new_container(azurite)
        a = target(c, writer_id=str(uuid.UUID(int=1)))
        b = target(c, writer_id=str(uuid.UUID(int=2)))
        p = Primary(tmp_path, 16 * MiB, seed=12)
        p.disk.write(0, p.rng.randbytes(p.size))
        await a.ensure_disk(p.disk_id, p.size)
        sid, path = p.initial()
        with pytest.raises(WriterConflict, match="another writer"):
            await b.ensure_disk(p.disk_id, p.size)
        with pytest.raises(WriterConflict):
            await b.send(p.disk_id, sid, path)
        await a.send(p.disk_id, sid, path)
        await a.commit(p.disk_id, sid)

        from azure.storage.blob.aio import BlobLeaseClient
        sid2, path2 = p.cycle(writes=40, zeros=0, trims=0, max_len=1 * MiB)
        rival = BlobLeaseClient(c.get_blob_client(a.blob_name(p.disk_id)), lease_id=str(uuid.UUID(int=3)))
        sending = asyncio.create_task(a.send(p.disk_id, sid2, path2))
        await asyncio.sleep(0.05)
        await rival.break_lease(lease_break_period=0)
        await rival.acquire(lease_duration=-1)
        with pytest.raises(WriterConflict):
            await sending
        with pytest.raises(WriterConflict):
            await a.commit(p.disk_id, sid2)
        assert [pt.generation for pt in await a.points(p.disk_id)] == [1]
        await rival.release()
        await c.delete_container()
        await c.close()
    run(go())


def test_corrupt_stream_writes_nothing(azurite, tmp_path):
    async def go():
        counter = RequestCounter()
        c = await new_container(azurite, counter=counter)
        t = target(c)
        p = Primary(tmp_path, 4 * MiB, seed=13)
        p.scatter(8)
        await t.ensure_disk(p.disk_id, p.size)
        sid, path = p.initial()
        with open(path, "r+b") as f:
            f.seek(-100, 2)
            byte = f.read(1)
            f.seek(-100, 2)
            f.write(bytes([byte[0] ^ 1]))
        counter.reset()
        with pytest.raises(DeltaFormatError):
            await t.send(p.disk_id, sid, path)
        assert counter.requests == 0
        assert (await blob_state(t, p.disk_id)).ip is None
        await c.delete_container()
        await c.close()
    run(go())


def test_azurite_started_twice_runs_once_and_stops():
    """`with Azurite().start() as az` (start, then the context manager's enter) once left the first
    process running after the block: the demo's leftover Azurite."""
    from replicator.azure.azurite import Azurite, azurite_binary
    if azurite_binary() is None:
        pytest.skip("azurite is not installed")
    az = Azurite(in_memory=True).start()
    first = az.proc.pid
    with az.start() as again:
        assert again.proc.pid == first
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)

"""Azure page blobs as a replica target: each disk is a page blob laid out as a fixed VHD (the disk's sectors,
then the 512-byte VHD footer written at creation), so after failover it can become an Azure managed disk.

send() verifies the whole stream locally first (a corrupt stream writes nothing), then applies its frames
directly to the blob: data as Put Page (coalesced, at most 4 MiB each), ZERO/TRIM as Clear Page, in parallel
under an adaptive window. Progress lives in the blob's metadata (meta.py), so after a kill the next send
of the same stream skips what the blob already acknowledged. commit() turns a completely applied stream
into a recovery point: a blob snapshot carrying generation, time and consistency; then the blob's
generation moves on and snapshots beyond the retention are pruned. A partial cycle never becomes a point.

Writer guard: an infinite blob lease whose id is this writer's stable identity (writer_id, by default
derived from the host and the container). Every write, metadata update and snapshot carries the lease,
so a second writer is refused at once (WriterConflict) and can never interleave with us, across cycles as
well as within one; the same primary restarting after a crash re-acquires its own lease immediately.
(Etags cannot guard parallel Put Pages, since each one changes the etag; sequence numbers only fence a
writer after the fact.) The lease outlives close(); `release()` gives the blob up for good.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

from .. import delta
from ..disk.vhd import FOOTER_SIZE, new_footer, parse_footer
from ..errors import FormatError, ReplicatorError, SequenceError, UsageError
from ..targets.base import DiskInfo, PointInfo, ReplicaTarget
from ..targets.outbox import OutboxStream
from .config import AzureConfig, parse_azure_url
from .crypto import KeyRing
from .keys import KeyedTarget
from .digests import DigestUpdate, apply_update, digests, sidecar_name
from .errors import AzureNotFound, BlobTooLarge, ContainerMissing, WriterConflict, classify
from .meta import PAGE_BLOB_MAX, BlobState, InProgress, Point, blob_size, disk_area, point_from, point_metadata
from .pages import CLEAR_CHUNK, Caller, Checkpointer, PageApplier, PageChannel, Window, feed

MiB = 1 << 20
log = logging.getLogger("replicator.azure")


@dataclass
class SendStats:
    """What the last send() did; tests and the benchmark read it."""
    frames: int = 0
    resumed_at: int = 0          # frames skipped because the blob already had them
    bytes_put: int = 0
    bytes_cleared: int = 0
    requests: int = 0
    retries: int = 0
    window_cuts: int = 0
    checkpoints: int = 0
    seconds: float = 0.0


class AzureTarget(KeyedTarget, ReplicaTarget):
    name = "azure"

    def __init__(self, where, *, retention: int = 8, max_age: float | None = None, concurrency: int = 8,
                 writer_id: str | None = None, prefix: str | None = None, checkpoint_bytes: int = 64 * MiB,
                 checkpoint_seconds: float = 5.0, zero_gap: int = 64 << 10, attempts: int = 6,
                 request_timeout: float = 120.0, bridge_ratio: float = 0.048, client_kw: dict | None = None,
                 key_file: str | None = None):
        """`where`: an asyncio ContainerClient, an AzureConfig, or an azure://ACCOUNT/CONTAINER URL.
        retention/max_age: recovery points kept (count, seconds); concurrency: page requests in flight at
        most; writer_id: the lease id (a UUID) naming this writer; checkpoint_*: how often progress is
        recorded; zero_gap/bridge_ratio: zero gaps sent to save a request (initial upload only); key_file:
        encrypt stored data with the customer's key (crypto.py)."""
        if isinstance(where, str):
            where = parse_azure_url(where)
        if isinstance(where, AzureConfig):
            opts = where.options
            retention = opts.get("retention", retention)
            concurrency = opts.get("concurrency", concurrency)
            writer_id = writer_id or opts.get("writer")
            max_age = opts.get("max_age", max_age)
            key_file = key_file or opts.get("key_file")
            checkpoint_bytes = opts.get("checkpoint_mib", checkpoint_bytes // MiB) * MiB
            prefix = where.prefix if prefix is None else prefix
            self.container = where.container_client(**(client_kw or {}))
            self._owns_client = True
        else:
            self.container, self._owns_client = where, False
        if retention < 0 or concurrency < 1:
            raise UsageError("retention must be >= 0 and concurrency >= 1")
        self.retention, self.max_age, self.concurrency = max(1, retention), max_age, concurrency
        self.prefix = (prefix or "").strip("/") + ("/" if (prefix or "").strip("/") else "")
        self.writer_id = str(uuid.UUID(writer_id)) if writer_id else default_writer_id(self.container.url,
                                                                                       self.prefix)
        self.checkpoint_bytes, self.checkpoint_seconds = checkpoint_bytes, checkpoint_seconds
        self.zero_gap, self.attempts, self.request_timeout = zero_gap, attempts, request_timeout
        self.bridge_ratio = bridge_ratio
        self.last_send = SendStats()
        self.prune_error: ReplicatorError | None = None
        self.keys = KeyRing.load(key_file) if key_file else None

    @classmethod
    def from_url(cls, url: str, **kw) -> "AzureTarget":
        """`--to azure://ACCOUNT/CONTAINER[/PREFIX][?SAS&options]` (see config.parse_azure_url)."""
        return cls(parse_azure_url(url), **kw)

    # ------------------------------------------------------------------ names and plumbing
    def blob_name(self, disk_id) -> str:
        return f"{self.prefix}{uuid.UUID(str(disk_id))}.vhd"

    def blob(self, disk_id):
        return self.container.get_blob_client(self.blob_name(disk_id))

    def _caller(self, window: Window | None = None) -> Caller:
        return Caller(window or Window(self.concurrency), attempts=self.attempts, timeout=self.request_timeout)

    async def _call(self, what: str, fn, *args, **kw):
        return await self._caller()(what, fn, *args, **kw)

    def _where(self, disk_id) -> str:
        return f"{self.container.container_name}/{self.blob_name(disk_id)}"

    # ------------------------------------------------------------------ the interface
    async def ensure_disk(self, disk_id: uuid.UUID, size: int, name: str = "", machine: str = "") -> DiskInfo:
        if size <= 0 or blob_size(size) > PAGE_BLOB_MAX:
            raise BlobTooLarge(f"disk {disk_id} of {size} bytes needs a page blob of {blob_size(size)} bytes; the "
                               f"page-blob limit is {PAGE_BLOB_MAX} (8 TiB) including the 512-byte VHD footer")
        try:
            state = await self._read_state(disk_id, missing_ok=True)
        except ContainerMissing:             # a new replica in a new container: made, as azcopy would
            await self._create_container()
            state = None
        if state is None:
            state = await self._create(disk_id, size, name, machine)
        elif state.disk_size != size:
            raise SequenceError(f"replica blob {self._where(disk_id)} is for a disk of {state.disk_size} bytes, the "
                                f"primary disk has {size}")
        lease = await self._lease(disk_id)
        changed = await self._take_key(disk_id, state)
        if machine and state.machine != machine:     # the machine's points group its disks by it
            state.machine, changed = machine, True
        if changed:
            await self._save(disk_id, lease, state)
        if state.generation == 0 and state.ip is None:
            await self._ensure_footer(disk_id, size)
        return _info(state)

    async def disk_info(self, disk_id: uuid.UUID) -> DiskInfo:
        return _info(await self._read_state(disk_id))

    async def send(self, disk_id: uuid.UUID, stream_id: str, path, throttle=None) -> int:
        _check_stream_id(stream_id)
        stream = OutboxStream.of(path)      # page writes follow the whole verified stream: wait for its end
        await stream.complete()
        path = stream.path
        start = time.monotonic()
        header, trailer = await asyncio.to_thread(_verify, path)
        lease = await self._lease(disk_id)
        state = await self._read_state(disk_id)
        if not self._needs_send(state, header, disk_id, stream_id):
            self.last_send = SendStats(frames=trailer.frames, resumed_at=trailer.frames)
            return 0
        if state.ip is None or state.ip.stream != stream_id:
            await self._begin(disk_id, lease, state, header, stream_id)
        stats = await self._apply(disk_id, lease, state, path, throttle, self._cipher(disk_id, state))
        stats.seconds = time.monotonic() - start
        self.last_send = stats
        return stats.bytes_put

    async def commit(self, disk_id: uuid.UUID, stream_id: str) -> PointInfo:
        _check_stream_id(stream_id)
        lease = await self._lease(disk_id)
        state = await self._read_state(disk_id)
        generation = state.committed_generation(stream_id)
        if generation is not None:             # committed before; the caller lost our answer
            point = await self._find_point(disk_id, stream=stream_id)
            if point is None:                  # pruned since: the generation is what matters
                return PointInfo(generation, 0.0, "crash")
            return PointInfo(generation, point.time, point.consistency)
        ip = state.ip
        if ip is None or ip.stream != stream_id or not ip.complete:
            raise SequenceError(f"stream {stream_id} was not completely sent to {self._where(disk_id)}: nothing to "
                                "commit, no recovery point made (send it again first)")
        point = await self._find_point(disk_id, stream=stream_id) or await self._snapshot(disk_id, lease, ip)
        state.generation, state.ip = ip.generation, None
        state.cut_time, state.cut_consistency = ip.created, ip.consistency
        state.add_committed(stream_id, ip.generation)
        await self._save(disk_id, lease, state)
        try:
            await self.prune(disk_id)
            self.prune_error = None
        except ReplicatorError as e:          # the point exists; pruning is retried after the next commit
            self.prune_error = e
        return PointInfo(point.generation, point.time, point.consistency)

    async def close(self) -> None:
        if self._owns_client:
            await self.container.close()

    # ------------------------------------------------------------------ points
    async def points(self, disk_id) -> list[Point]:
        """Recovery points (snapshots we made) of a disk, oldest first."""
        name, out = self.blob_name(disk_id), []
        try:
            async for item in self.container.list_blobs(name_starts_with=name, include=["snapshots", "metadata"]):
                if item.name == name and item.snapshot:
                    p = point_from(item.snapshot, item.metadata)
                    if p is not None:
                        out.append(p)
        except Exception as e:       # noqa: BLE001 - classified
            raise classify(e, f"list snapshots of {self._where(disk_id)}") from None
        return sorted(out, key=lambda p: (p.generation, p.snapshot))

    async def prune(self, disk_id) -> list[Point]:
        """Delete plain cycle points (not machine points: points.py keeps those) beyond the retention count
        or older than max_age, never the latest snapshot. Once the disk has machine points, a plain point is
        only kept until a machine point covers its generation."""
        pts = await self.points(disk_id)
        if not pts:
            return []
        plain = [p for p in pts if p.machine_point is None]
        newest_machine = max((p.generation for p in pts if p.machine_point is not None), default=None)
        if newest_machine is not None:
            plain = [p for p in plain if p.generation <= newest_machine] + \
                [p for p in plain if p.generation > newest_machine][:-self.retention]
        else:
            kept = plain[-self.retention:]
            if self.max_age is not None:
                kept = [p for p in kept if p.time >= time.time() - self.max_age]
            plain = [p for p in plain if p not in kept]
        gone = [p for p in plain if p.snapshot != pts[-1].snapshot]
        await self.delete_points(disk_id, gone)
        return gone

    async def delete_points(self, disk_id, points) -> None:
        for p in points:
            snap = self.container.get_blob_client(self.blob_name(disk_id), snapshot=p.snapshot)
            await self._call(f"delete snapshot {p.snapshot} of {self._where(disk_id)}", snap.delete_blob)

    async def checkpoint(self, disk_id, generation: int, point: int, prepared: bool = False,
                         additional_points: int | None = None, disks: int | None = None) -> None:
        """The machine's cycle `point` ended at `generation` of this disk: snapshot it as the disk's part of
        machine point `point` and apply the machine's retention (points.py; a snapshot is the disk's point
        there, so `disks` changes nothing)."""
        from .points import checkpoint
        await checkpoint(self, disk_id, generation, point, prepared, additional_points)

    async def _find_point(self, disk_id, *, stream: str | None = None, generation: int | None = None):
        for p in reversed(await self.points(disk_id)):
            if (stream is not None and p.stream == stream) or (generation is not None and p.generation == generation):
                return p
        return None

    async def _snapshot(self, disk_id, lease: str, ip: InProgress) -> Point:
        meta = point_metadata(ip.generation, ip.created, ip.consistency, ip.stream, ip.kind, self._key_id(disk_id))
        res = await self._call(f"snapshot {self._where(disk_id)}", self.blob(disk_id).create_snapshot,
                               metadata=meta, lease=lease)
        return Point(ip.generation, ip.created, ip.consistency, ip.stream, res["snapshot"])

    # ------------------------------------------------------------------ digests (digests.py)
    async def _update_digests(self, disk_id, state: BlobState, update, cipher) -> None:
        """The digest sidecar follows the blob; if that fails it is only in doubt (rebuilt when needed)."""
        try:
            await apply_update(self, disk_id, state, update, cipher)
        except ReplicatorError as e:
            log.warning("%s: digest sidecar not updated (rebuilt from the blob when a resync needs it): %s",
                        self._where(disk_id), e.message)

    async def digests(self, disk_id, block_size: int):
        """Per-block digests for a checksum resync, from the digest sidecar (digests.py)."""
        return await digests(self, disk_id, block_size)

    # ------------------------------------------------------------------ lease
    async def _lease(self, disk_id) -> str:
        """Take, or confirm we still hold, the blob's infinite lease under our writer id (acquiring with the
        current id succeeds, so this also re-takes our own lease after a crash). Done before every send,
        commit and ensure_disk: a rival is refused before anything is read or written."""
        from azure.storage.blob.aio import BlobLeaseClient
        client = BlobLeaseClient(self.blob(disk_id), lease_id=self.writer_id)
        await self._call(f"lease {self._where(disk_id)}", client.acquire, lease_duration=-1)
        return self.writer_id

    async def delete_disk(self, disk_id) -> bool:
        """The blob and its snapshots (recovery points), under our lease, and its digest sidecar."""
        if await self._read_state(disk_id, missing_ok=True) is None:
            return False
        lease = await self._lease(disk_id)
        await self._call(f"delete {self._where(disk_id)}", self.blob(disk_id).delete_blob,
                         delete_snapshots="include", lease=lease)
        side = self.container.get_blob_client(sidecar_name(self, disk_id))
        try:
            await self._call(f"delete {side.blob_name}", side.delete_blob)
        except AzureNotFound:
            pass
        return True

    async def release(self, disk_id) -> None:
        """Give up the blob (planned failover, disabling replication): another writer may take it."""
        from azure.storage.blob.aio import BlobLeaseClient
        client = BlobLeaseClient(self.blob(disk_id), lease_id=self.writer_id)
        await self._call(f"release lease on {self._where(disk_id)}", client.release)

    # ------------------------------------------------------------------ state
    async def _read_state(self, disk_id, missing_ok: bool = False) -> BlobState | None:
        try:
            props = await self._call(f"read {self._where(disk_id)}", self.blob(disk_id).get_blob_properties)
        except ContainerMissing:
            raise
        except AzureNotFound:
            if missing_ok:
                return None
            raise AzureNotFound(f"{self._where(disk_id)}: no replica of disk {disk_id} here (ensure_disk creates "
                                "it)") from None
        state = BlobState.from_metadata(props.metadata, self._where(disk_id))
        if state.disk_id != str(disk_id):
            raise WriterConflict(f"{self._where(disk_id)} holds disk {state.disk_id}, not {disk_id}")
        if props.size != blob_size(state.disk_size):
            raise WriterConflict(f"{self._where(disk_id)} is {props.size} bytes, expected {blob_size(state.disk_size)}:"
                                 " resized by someone else")
        return state

    async def _save(self, disk_id, lease: str, state: BlobState) -> None:
        await self._call(f"update metadata of {self._where(disk_id)}", self.blob(disk_id).set_blob_metadata,
                         state.to_metadata(), lease=lease)

    async def _create_container(self) -> None:
        """Create the container (private access); one made meanwhile by another writer serves as well."""
        from azure.core.exceptions import ResourceExistsError

        async def create(**kw):
            try:
                await self.container.create_container(**kw)
            except ResourceExistsError:
                pass
        await self._call(f"create container {self.container.container_name}", create)

    async def _create(self, disk_id, size: int, name: str, machine: str = "") -> BlobState:
        state = BlobState(str(disk_id), size, name, machine=machine)
        try:
            await self._call(f"create {self._where(disk_id)}", self.blob(disk_id).create_page_blob, blob_size(size),
                             metadata=state.to_metadata(), if_none_match="*")
        except WriterConflict:               # created meanwhile (by us before a crash, or a rival): read it
            state = await self._read_state(disk_id)
            if state.disk_size != size:
                raise SequenceError(f"{self._where(disk_id)} was created for {state.disk_size} bytes, not {size}")
        return state

    async def _ensure_footer(self, disk_id, size: int) -> None:
        """The fixed-VHD footer after the disk's sectors (rewritten only if missing, e.g. after a crash)."""
        at = disk_area(size)
        stream = await self._call(f"read footer of {self._where(disk_id)}", self.blob(disk_id).download_blob,
                                  offset=at, length=FOOTER_SIZE)
        try:
            parse_footer(await stream.readall(), at, self._where(disk_id))
            return
        except FormatError:
            pass
        footer = new_footer(at).pack()
        await self._call(f"write footer of {self._where(disk_id)}", self.blob(disk_id).upload_page, footer,
                         offset=at, length=FOOTER_SIZE, lease=self.writer_id)

    # ------------------------------------------------------------------ send internals
    def _needs_send(self, state: BlobState, header, disk_id, stream_id: str) -> bool:
        where = self._where(disk_id)
        if str(header.disk_id) != str(disk_id) or header.disk_size != state.disk_size:
            raise SequenceError(f"stream {stream_id} is for disk {header.disk_id} of {header.disk_size} bytes, "
                                f"{where} holds {state.disk_id} of {state.disk_size} bytes")
        if state.committed_generation(stream_id) is not None:
            return False
        if header.base_generation != state.generation:
            raise SequenceError(f"stream {stream_id} applies on generation {header.base_generation}, {where} holds "
                                f"{state.generation} (a cycle is missing or was already applied)")
        if header.generation <= state.generation:
            raise SequenceError(f"stream generation {header.generation} is not newer than {state.generation}")
        return not (state.ip is not None and state.ip.stream == stream_id and state.ip.complete)

    async def _begin(self, disk_id, lease: str, state: BlobState, header, stream_id: str) -> None:
        """Bring the blob to a known base before a new stream: zeros for a full stream; for a delta, the last
        point if another stream was left half-applied. A resync stream needs no restore: it carries every
        block of the regions that may differ (compared against the blob as it is, half-applied stream
        included: digests.py), so what the dead stream left is levelled, and Azure keeps what it already
        holds. Then record the new stream as in progress."""
        abandoned = state.ip is not None
        if header.kind == "full" and not state.zeroed:
            await self._clear_all(disk_id, lease, state.disk_size)
            state.zeroed = True
        elif header.kind == "delta" and abandoned:
            await self._restore(disk_id, lease, state)
        state.ip = InProgress(stream_id, header.generation, header.base_generation, header.created,
                              header.consistency, header.kind, on_zeros=header.kind == "full" and state.zeroed)
        state.zeroed = False
        await self._save(disk_id, lease, state)

    async def _clear_all(self, disk_id, lease: str, size: int) -> None:
        ch = PageChannel(self.blob(disk_id), lease, self._caller(Window(self.concurrency)))
        area = disk_area(size)
        for pos in range(0, area, CLEAR_CHUNK):
            await ch.clear(pos, min(CLEAR_CHUNK, area - pos), 0)
        await ch.drain()

    async def _restore(self, disk_id, lease: str, state: BlobState) -> None:
        """Undo a half-applied stream: copy the point of the blob's generation back over it."""
        if state.generation == 0:
            await self._clear_all(disk_id, lease, state.disk_size)
            return
        point = await self._find_point(disk_id, generation=state.generation)
        if point is None:
            raise SequenceError(f"{self._where(disk_id)}: stream {state.ip.stream} was left half-applied and no "
                                f"snapshot of generation {state.generation} remains to undo it: resync required")
        src = self.container.get_blob_client(self.blob_name(disk_id), snapshot=point.snapshot)
        blob = self.blob(disk_id)
        res = await self._call(f"restore {self._where(disk_id)} from {point.snapshot}", blob.start_copy_from_url,
                               src.url, metadata=state.to_metadata(), destination_lease=lease)
        await wait_copy(self, blob, res, f"restore {self._where(disk_id)}")

    async def _apply(self, disk_id, lease: str, state: BlobState, path: str, throttle, cipher) -> SendStats:
        ip = state.ip
        resume = ip.frames_done
        stats = SendStats(resumed_at=resume)
        window = Window(self.concurrency)
        caller = self._caller(window)
        where, blob = self._where(disk_id), self.blob(disk_id)

        async def save(**kw):
            await blob.set_blob_metadata(state.to_metadata(), lease=lease, **kw)
        saver = Checkpointer(state, lambda: caller(f"checkpoint {where}", save), self.checkpoint_bytes,
                             self.checkpoint_seconds)
        ch = PageChannel(self.blob(disk_id), lease, caller, throttle=throttle, cipher=cipher,
                         on_progress=lambda w: saver.progress(w, ch.bytes_put))
        applier = PageApplier(ch, state.disk_size, skip_zeros=ip.on_zeros, zero_gap=self.zero_gap,
                              bridge_ratio=self.bridge_ratio)
        saver.base_bytes = ip.bytes_done
        update = DigestUpdate(state.disk_size)
        applier.on_frame = update.frame
        try:
            stats.frames = await feed(path, applier, resume)
            await saver.wait()
            await self._update_digests(disk_id, state, update, cipher)
        except BaseException as e:
            ch.abort()
            if isinstance(e, asyncio.CancelledError):
                saver.cancel()                # killed: leave the blob as a kill would
            else:
                await saver.last_try(ch.watermark, ch.bytes_put)
            raise
        ip.frames_done, ip.bytes_done, ip.complete = stats.frames, ip.bytes_done + ch.bytes_put, True
        await self._save(disk_id, lease, state)
        stats.bytes_put, stats.bytes_cleared, stats.requests = ch.bytes_put, ch.bytes_cleared, ch.requests
        stats.retries, stats.window_cuts, stats.checkpoints = caller.retries, window.cuts, saver.count
        return stats


async def wait_copy(target: AzureTarget, blob, res: dict, what: str, timeout: float = 3600.0) -> None:
    """Poll a server-side copy until it finishes (Azure may copy asynchronously; Azurite does not)."""
    status, deadline = res.get("copy_status"), time.monotonic() + timeout
    while status == "pending":
        if time.monotonic() > deadline:
            raise classify(asyncio.TimeoutError(), what)
        await asyncio.sleep(0.5)
        props = await target._call(what, blob.get_blob_properties)
        status = props.copy.status
    if status != "success":
        raise classify(RuntimeError(f"copy ended {status}"), what)


def _verify(path: str):
    try:
        with open(path, "rb") as f:
            return delta.verify_stream(f, path=path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such stream file") from None


def _check_stream_id(stream_id: str) -> None:
    if not stream_id or len(stream_id) > 64 or any(c not in "0123456789abcdefABCDEF-" for c in stream_id):
        raise UsageError(f"invalid stream id {stream_id!r}")


def _info(state: BlobState) -> DiskInfo:
    return DiskInfo(state.disk_id, state.disk_size, state.generation, tuple(s for s, _ in state.committed))


def default_writer_id(container_url: str, prefix: str = "") -> str:
    """This host's stable lease id for a container: a restarted primary finds its own lease again."""
    who = os.environ.get("REPLICATOR_WRITER_ID") or socket.gethostname()
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"replicator-writer:{who}:{container_url.split('?')[0]}/{prefix}"))

"""Failover from Azure recovery points: every point is a snapshot of the replica page blob, so failing over
is a server-side copy of one snapshot to a new page blob (already a fixed VHD an Azure disk can be made
from); a test failover is the same copy under a test name, while replication carries on into the replica.
A copy is only reported once its content digest equals the snapshot's; a copy that differs is deleted.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass

from .. import kernels
from ..errors import UsageError
from .errors import VerifyError
from .meta import PREFIX, Point
from .target import AzureTarget, wait_copy

PIECE = 8 << 20                  # digest reads, per request
READ_AHEAD = 4                   # digest reads in flight


@dataclass(frozen=True)
class FailoverResult:
    blob: str
    url: str                     # without credentials
    generation: int
    time: float
    consistency: str
    test: bool
    digest: str                  # XXH3-128 of the blob's whole content
    size: int
    seconds: float


async def list_points(target: AzureTarget, disk_id) -> list[Point]:
    """The disk's recovery points, oldest first."""
    return await target.points(disk_id)


async def pick_point(target: AzureTarget, disk_id, generation: int | None) -> Point:
    pts = await target.points(disk_id)
    if not pts:
        raise UsageError(f"{target.blob_name(disk_id)}: no recovery points")
    if generation is None:
        return pts[-1]
    for p in pts:
        if p.generation == generation:
            return p
    raise UsageError(f"no recovery point at generation {generation} (have {[p.generation for p in pts]})")


async def failover(target: AzureTarget, disk_id, *, generation: int | None = None, dest: str | None = None,
                   test: bool = False, verify: bool = True) -> FailoverResult:
    """Copy a point (the latest by default) to a new page blob and verify it. `dest` names the blob;
    by default DISK-failover-gN.vhd, or DISK-test-gN-TIME.vhd for a test failover."""
    start = time.monotonic()
    point = await pick_point(target, disk_id, generation)
    name = dest or _dest_name(target, disk_id, point.generation, test)
    src = target.container.get_blob_client(target.blob_name(disk_id), snapshot=point.snapshot)
    dst = target.container.get_blob_client(name)
    if await target._call(f"look for {name}", dst.exists):
        raise UsageError(f"{name} already exists: choose another destination or clean it up first")
    meta = {PREFIX + "failover_of": str(uuid.UUID(str(disk_id))), PREFIX + "generation": str(point.generation),
            PREFIX + "time": repr(point.time), PREFIX + "consistency": point.consistency,
            PREFIX + "test": "1" if test else "0"}
    try:        # as with files (durable.output_path): a copy that did not finish and verify is not left behind
        res = await target._call(f"copy {point.snapshot} to {name}", dst.start_copy_from_url, src.url,
                                 metadata=meta)
        await wait_copy(target, dst, res, f"copy to {name}")
        size = (await target._call(f"read {name}", dst.get_blob_properties)).size
        digest = await blob_digest(target, dst, size)
        if verify:
            want = await blob_digest(target, src, size)
            if want != digest:
                raise VerifyError(f"copy of point {point.generation} to {name} differs from the snapshot "
                                  f"({digest.hex()} != {want.hex()}); the copy was deleted")
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(target._call(f"delete unfinished copy {name}", dst.delete_blob))
        raise
    return FailoverResult(name, dst.url.split("?")[0], point.generation, point.time, point.consistency, test,
                          digest.hex(), size, time.monotonic() - start)


async def test_failover(target: AzureTarget, disk_id, *, generation: int | None = None,
                        verify: bool = True) -> FailoverResult:
    return await failover(target, disk_id, generation=generation, test=True, verify=verify)


async def test_blobs(target: AzureTarget, disk_id) -> list[str]:
    """Test-failover blobs made from this disk."""
    out, disk = [], str(uuid.UUID(str(disk_id)))
    base = f"{target.prefix}{disk}-"
    async for item in target.container.list_blobs(name_starts_with=base, include=["metadata"]):
        m = {k.lower(): v for k, v in (item.metadata or {}).items()}
        if m.get(PREFIX + "failover_of") == disk and m.get(PREFIX + "test") == "1":
            out.append(item.name)
    return out


async def cleanup(target: AzureTarget, disk_id, *, blob: str | None = None, break_lease: bool = False) -> list[str]:
    """Delete test-failover blobs (one, or all of the disk's); with break_lease, also free the replica blob
    of a writer that is certainly gone. Returns what was deleted."""
    names = [blob] if blob else await test_blobs(target, disk_id)
    if blob and blob not in await test_blobs(target, disk_id):
        raise UsageError(f"{blob} is not a test failover of disk {disk_id}")
    for name in names:
        await target._call(f"delete {name}", target.container.get_blob_client(name).delete_blob)
    if break_lease:
        from azure.storage.blob.aio import BlobLeaseClient
        lease = BlobLeaseClient(target.blob(disk_id))
        await target._call(f"break lease on {target.blob_name(disk_id)}", lease.break_lease, lease_break_period=0)
    return names


async def blob_digest(target: AzureTarget, blob, size: int) -> bytes:
    """XXH3-128 of a blob's content (0..size), reading only its valid page ranges: the rest reads as zeros.
    Equal content gives equal digests however the pages came to be (written zeros or never written)."""
    ranges = await _ranges(target, blob, size)
    hasher, pos = kernels.Xxh3Hasher(), 0
    pieces = [(s, min(s + PIECE, e)) for s, e in ranges for s in range(s, e, PIECE)]
    for i in range(0, len(pieces), READ_AHEAD):
        batch = pieces[i:i + READ_AHEAD]
        datas = await asyncio.gather(*(_read(target, blob, s, e - s) for s, e in batch))
        for (s, e), data in zip(batch, datas):
            _zeros(hasher, s - pos)
            hasher.update(data)
            pos = e
    _zeros(hasher, size - pos)
    return hasher.digest()


async def _ranges(target: AzureTarget, blob, size: int) -> list[tuple[int, int]]:
    """Valid page ranges, merged and clipped, as [start, end) pairs in order."""
    out: list[tuple[int, int]] = []

    async def collect(**kw):
        out.clear()
        async for r in blob.list_page_ranges(**kw):
            if r.cleared:
                continue
            s, e = r.start, min(r.end + 1, size)
            if out and out[-1][1] >= s:
                out[-1] = (out[-1][0], max(out[-1][1], e))
            elif s < e:
                out.append((s, e))
    await target._call(f"list page ranges of {blob.blob_name}", collect)
    return out


async def _read(target: AzureTarget, blob, offset: int, length: int) -> bytes:
    async def get(**kw):
        stream = await blob.download_blob(offset=offset, length=length, **kw)
        return await stream.readall()
    data = await target._call(f"read {blob.blob_name} [{offset}, {offset + length})", get)
    if len(data) != length:
        raise VerifyError(f"{blob.blob_name}: read {len(data)} of {length} bytes at {offset}")
    return data


_ZERO = bytes(PIECE)


def _zeros(hasher, n: int) -> None:
    while n > 0:
        k = min(n, PIECE)
        hasher.update(memoryview(_ZERO)[:k])
        n -= k


def _dest_name(target: AzureTarget, disk_id, generation: int, test: bool) -> str:
    disk = str(uuid.UUID(str(disk_id)))
    if test:
        return f"{target.prefix}{disk}-test-g{generation}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}.vhd"
    return f"{target.prefix}{disk}-failover-g{generation}.vhd"

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

from ..errors import UsageError
from .errors import VerifyError
from .meta import PREFIX, Point
from .meta import FOOTER
from .pages import MAX_PUT
from .reader import blob_digest, read_ranges
from .target import AzureTarget, wait_copy


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
                   test: bool = False, verify: bool = True, point: Point | None = None) -> FailoverResult:
    """Copy a point (the latest by default, or `point`) to a new page blob and verify it. `dest` names the
    blob; by default DISK-failover-gN.vhd, or DISK-test-gN-TIME.vhd for a test failover. An encrypted point
    is decrypted into the new blob (a wrong or missing key is refused before the blob is made)."""
    start = time.monotonic()
    point = point or await pick_point(target, disk_id, generation)
    cipher = target.cipher_for(disk_id, point.key_id)
    name = dest or _dest_name(target, disk_id, point.generation, test)
    src = target.container.get_blob_client(target.blob_name(disk_id), snapshot=point.snapshot)
    dst = target.container.get_blob_client(name)
    if await target._call(f"look for {name}", dst.exists):
        raise UsageError(f"{name} already exists: choose another destination or clean it up first")
    meta = {PREFIX + "failover_of": str(uuid.UUID(str(disk_id))), PREFIX + "generation": str(point.generation),
            PREFIX + "time": repr(point.time), PREFIX + "consistency": point.consistency,
            PREFIX + "test": "1" if test else "0"}
    try:        # as with files (durable.output_path): a copy that did not finish and verify is not left behind
        if cipher is None:
            res = await target._call(f"copy {point.snapshot} to {name}", dst.start_copy_from_url, src.url,
                                     metadata=meta)
            await wait_copy(target, dst, res, f"copy to {name}")
        else:
            await decrypting_copy(target, src, dst, cipher, meta)
        size = (await target._call(f"read {name}", dst.get_blob_properties)).size
        digest = await blob_digest(target, dst, size)
        if verify:
            want = await blob_digest(target, src, size, size - FOOTER, cipher)
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


async def decrypting_copy(target: AzureTarget, src, dst, cipher, meta: dict) -> None:
    """The snapshot's plaintext into a new page blob (the footer is stored in the clear already)."""
    size = (await target._call(f"read {src.blob_name}", src.get_blob_properties)).size
    await target._call(f"create {dst.blob_name}", dst.create_page_blob, size, metadata=meta, if_none_match="*")
    async for offset, data in read_ranges(target, src, size, size - FOOTER, cipher):
        for at in range(0, len(data), MAX_PUT):
            piece = data[at:at + MAX_PUT]
            await target._call(f"write {dst.blob_name}", dst.upload_page, piece, offset=offset + at,
                               length=len(piece))


def _dest_name(target: AzureTarget, disk_id, generation: int, test: bool) -> str:
    disk = str(uuid.UUID(str(disk_id)))
    if test:
        return f"{target.prefix}{disk}-test-g{generation}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}.vhd"
    return f"{target.prefix}{disk}-failover-g{generation}.vhd"

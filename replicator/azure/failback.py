"""Failback from Azure (ASR's two options) into the on-premises copy of a disk (any BlockDevice: the
original VHDX):

- **minimize downtime**: `sync_pass` while the Azure VM still runs (a snapshot of its disk's blob is read
  and compared block by block with the on-premises disk; only differing blocks are written there), then
  once it is stopped a final `sync_pass` with the first pass's snapshot as the base: only the ranges the
  blob changed since (Azure's page-range diff) are read and compared, and only differing blocks written.
  Nothing depends on the diff being minimal: a diff listing everything (Azurite's) only costs reads.
- **full download**: `sync_pass(..., full=True)` writes every block.

Afterwards the on-premises disk equals the blob at the final snapshot; replication back to Azure resumes
with a checksum resync against the replica blob's digest sidecar (digests.py), which ships only the
blocks that differ. Reading a blob's pages is the cost (there is no code running in Azure to digest them
there); writes on premises are only the differing blocks.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..resync.engine import Grid
from ..errors import UsageError
from .digests import BLOCK
from .meta import FOOTER, blob_size
from .reader import page_ranges, read_ranges

ZERO_PIECE = bytes(BLOCK)


@dataclass
class PassResult:
    snapshot: str                 # the snapshot read (the base of the next pass)
    blocks_compared: int
    blocks_written: int
    bytes_read: int               # from Azure
    bytes_written: int            # on premises
    seconds: float


async def _snapshot(target, blob) -> str:
    res = await target._call(f"snapshot {blob.blob_name}", blob.create_snapshot)
    return res["snapshot"]


async def _diff(target, snap, base: str, size: int):
    """Ranges changed or cleared since `base`, as Azure's page-range diff says."""
    out: list[tuple[int, int]] = []

    async def collect(**kw):
        out.clear()
        async for r in snap.list_page_ranges(previous_snapshot=base, **kw):
            out.append((r.start, min(r.end + 1, size)))
    await target._call(f"list changed ranges of {snap.blob_name}", collect)
    return [(s, e) for s, e in out if s < e]


def _subtract(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ranges `a` no range of `b` covers (both sorted, disjoint)."""
    out, j = [], 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k, pos = j, s
        while k < len(b) and b[k][0] < e:
            if b[k][0] > pos:
                out.append((pos, b[k][0]))
            pos = max(pos, b[k][1])
            k += 1
        if pos < e:
            out.append((pos, e))
    return out


def _blocks(ranges, n: int) -> np.ndarray:
    mask = np.zeros(n, bool)
    for s, e in ranges:
        mask[s // BLOCK:-(-e // BLOCK)] = True
    return mask


def _runs(mask: np.ndarray, size: int) -> list[tuple[int, int]]:
    """Byte ranges of the runs of True blocks."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return [(int(a) * BLOCK, min(int(b) * BLOCK, size)) for a, b in zip(edges[::2], edges[1::2])]


async def sync_pass(target, blob_name: str, disk, *, base: str | None = None, full: bool = False,
                    progress=None) -> PassResult:
    """Make `disk` (the on-premises copy, opened read-write) equal to a new snapshot of blob `blob_name`
    (a failed-over VM's disk, a fixed VHD: the disk's bytes first). `base`: the previous pass's snapshot,
    so only what changed since is read: the diff's ranges, and whatever held data at `base` and holds none
    now (a diff that leaves cleared pages out still levels them). `progress(offset)`: how far through the
    disk the pass is (for a job)."""
    start = time.monotonic()
    size = disk.size
    n = Grid(BLOCK, size).n_blocks
    blob = target.container.get_blob_client(blob_name)
    have = (await target._call(f"read {blob_name}", blob.get_blob_properties)).size
    if have != blob_size(size):
        raise UsageError(f"{blob_name} is a disk of {have - FOOTER} bytes (fixed VHD of {have}); {disk.path} has "
                         f"{size}: not the same disk")
    snapshot = await _snapshot(target, blob)
    snap = target.container.get_blob_client(blob_name, snapshot=snapshot)
    valid = await page_ranges(target, snap, size)
    if base is None:
        wanted = np.ones(n, bool)
    else:
        old = await page_ranges(target, target.container.get_blob_client(blob_name, snapshot=base), size)
        wanted = _blocks(await _diff(target, snap, base, size), n) | _blocks(_subtract(old, valid), n)
    with_data = wanted & _blocks(valid, n)
    stats = {"read": 0, "written": 0, "blocks": 0}

    def apply(at: int, data: bytes) -> None:
        """Compare the blocks of one piece with the disk's and write the differing ones."""
        ours = kernels.xxh3_128_blocks(disk.read(at, len(data)), BLOCK, threads=1)
        theirs = kernels.xxh3_128_blocks(data, BLOCK, threads=1)
        for i in np.flatnonzero((ours != theirs).any(axis=1) | full):
            lo, hi = int(i) * BLOCK, min((int(i) + 1) * BLOCK, len(data))
            disk.write(at + lo, data[lo:hi])
            stats["written"] += hi - lo
            stats["blocks"] += 1

    async for at, data in read_ranges(target, snap, size, ranges=_runs(with_data, size)):
        stats["read"] += len(data)
        await asyncio.to_thread(apply, at, data)
        if progress:
            progress(at + len(data))
    for lo, hi in _runs(wanted & ~with_data, size):          # no data on the blob there: zeros
        for at in range(lo, hi, BLOCK):
            await asyncio.to_thread(apply, at, ZERO_PIECE[:min(BLOCK, hi - at)])
    await asyncio.to_thread(disk.flush)
    if base is not None:                              # the previous pass's snapshot is not needed any more
        await target._call(f"delete snapshot {base} of {blob_name}",
                           target.container.get_blob_client(blob_name, snapshot=base).delete_blob)
    return PassResult(snapshot, int(wanted.sum()), stats["blocks"], stats["read"], stats["written"],
                      time.monotonic() - start)


async def finish(target, blob_name: str, snapshot: str) -> None:
    """Drop the last pass's snapshot once the failback is complete."""
    snap = target.container.get_blob_client(blob_name, snapshot=snapshot)
    await target._call(f"delete snapshot {snapshot} of {blob_name}", snap.delete_blob)

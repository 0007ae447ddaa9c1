"""Per-block digests of a replica blob, kept in a digest sidecar page blob (`DISK.digests`) so a checksum
resync against Azure ships only the blocks that differ, as against a peer replica.

Layout: XXH3-128 of each 64 KiB block of the disk (the resync block; the last block may be short) as 16
bytes at offset 16 * block; an all-zero entry stands for a block of zeros, so a new or cleared sidecar
(Clear Page) says "all zeros" without being written. Encrypted replicas keep the sidecar encrypted too
(its own key, derived like the data's), since digests of plaintext would tell known contents apart.

Every applied stream updates it: blocks a frame covers whole get their digest from the frame itself,
blocks a frame covers only partly are read back (decrypted) after the stream is applied. The sidecar's
metadata names the stream whose result it describes; it is trusted only when that is the stream of the
blob's committed generation. Otherwise ("in doubt": a sidecar update lost or cut short) the blob's pages
are read and the sidecar rebuilt before it is used. With a stream left half-applied (a primary killed
mid-upload) the digests are those of the blob as it is, and the resync stream they serve is applied
without undoing the dead stream first (target._begin): what Azure already holds is not sent again.
"""
from __future__ import annotations

import numpy as np

from .. import kernels
from ..resync.engine import Grid
from .errors import AzureNotFound
from .meta import PREFIX, SECTOR, fields
from .pages import MAX_PUT, align_up
from .reader import page_ranges, read, read_ranges

BLOCK = 64 << 10                  # the cycle driver's RESYNC_BLOCK
ROW = 16


class DigestUpdate:
    """Collects, frame by frame, what a stream does to the blocks: digests of blocks covered whole (in
    stream order, later frames win) and the blocks covered only partly (read back at the end)."""

    def __init__(self, disk_size: int):
        self.grid = Grid(BLOCK, disk_size)
        self.size = disk_size
        self.chunks: list[tuple[int, np.ndarray]] = []
        self.partial: set[int] = set()

    def frame(self, frame) -> None:
        start, end = frame.offset, min(frame.offset + frame.length, self.size)
        if end <= start:
            return
        first, last = start // BLOCK, (end - 1) // BLOCK
        lo = -(-start // BLOCK)                         # first block starting inside the frame
        hi = end // BLOCK if end < self.size else self.grid.n_blocks
        for b in (first, last):
            if not lo <= b < hi:
                self.partial.add(b)
        if lo >= hi:
            return
        for b in range(lo, hi):
            self.partial.discard(b)
        if frame.data is None:
            self.chunks.append((lo, np.zeros((hi - lo, 2), np.uint64)))
        else:
            mv = memoryview(frame.data)[lo * BLOCK - start:min(hi * BLOCK, self.size) - start]
            self.chunks.append((lo, kernels.xxh3_128_blocks(mv, BLOCK, threads=1)))


def sidecar_name(target, disk_id) -> str:
    return target.blob_name(disk_id)[:-len(".vhd")] + ".digests"


def _rows_size(n_blocks: int) -> int:
    return max(SECTOR, align_up(n_blocks * ROW))


def _stored(grid: Grid, first: int, digests: np.ndarray) -> np.ndarray:
    """Zero-block digests become zero rows (the sidecar's "reads as zeros")."""
    out = digests.copy()
    out[(digests == grid.zero_digests(first, len(digests))).all(axis=1)] = 0
    return out


async def _sidecar_state(target, disk_id) -> str | None:
    """The stream whose result the sidecar describes ("" in doubt, None when there is no sidecar)."""
    blob = target.container.get_blob_client(sidecar_name(target, disk_id))
    try:
        props = await target._call(f"read {blob.blob_name}", blob.get_blob_properties)
    except AzureNotFound:
        return None
    return fields(props.metadata).get("digests_of", "")


def _stream_of(state, generation: int) -> str:
    """The committed stream that made `generation` ("" when no longer known)."""
    return next((sid for sid, g in state.committed if g == generation), "")


async def _write_rows(target, disk_id, rows: dict[int, np.ndarray], n_blocks: int, cipher, fresh: bool) -> None:
    """Write changed rows (block -> 16 bytes), sector by sector; other rows of a touched sector are read."""
    blob = target.container.get_blob_client(sidecar_name(target, disk_id))
    size = _rows_size(n_blocks)
    if fresh:
        await target._call(f"create {blob.blob_name}", blob.create_page_blob, size,
                           metadata={PREFIX + "digests_of": ""})
    per = SECTOR // ROW
    sectors = sorted({b // per for b in rows})
    runs: list[list[int]] = []
    for s in sectors:
        if runs and runs[-1][-1] == s - 1 and (len(runs[-1]) + 1) * SECTOR <= MAX_PUT:
            runs[-1].append(s)
        else:
            runs.append([s])
    for run in runs:
        at, length = run[0] * SECTOR, len(run) * SECTOR
        if fresh:
            buf = bytearray(length)
        else:
            buf = bytearray(await read(target, blob, at, length))
            if cipher is not None:
                buf = bytearray(cipher.decrypt(at, buf))
        for s in run:
            for b in range(s * per, (s + 1) * per):
                if b in rows:
                    off = b * ROW - at
                    buf[off:off + ROW] = rows[b].astype("<u8").tobytes()
        data = bytes(buf) if cipher is None else cipher.encrypt(at, bytes(buf))
        await target._call(f"write {blob.blob_name}", blob.upload_page, data, offset=at, length=length)


async def _mark(target, disk_id, stream: str) -> None:
    blob = target.container.get_blob_client(sidecar_name(target, disk_id))
    await target._call(f"mark {blob.blob_name}", blob.set_blob_metadata, {PREFIX + "digests_of": stream})


async def apply_update(target, disk_id, state, update: DigestUpdate, cipher) -> None:
    """After a stream was applied to the blob (state.ip): bring the sidecar to its generation, if the
    sidecar described the stream's base (else it stays in doubt, and is rebuilt when needed)."""
    ip = state.ip
    have = await _sidecar_state(target, disk_id)
    full = ip.kind == "full" and ip.on_zeros
    if not full and (not have or have != _stream_of(state, ip.base)):
        return
    if not full:
        await _mark(target, disk_id, "")                      # in doubt while it is written
    rows: dict[int, np.ndarray] = {}
    for first, digests in update.chunks:
        for i, d in enumerate(_stored(update.grid, first, digests)):
            rows[first + i] = d
    blob = target.blob(disk_id)
    for b in sorted(update.partial):
        lo, hi = b * BLOCK, min((b + 1) * BLOCK, update.size)
        data = await read(target, blob, lo, align_up(hi) - lo)
        if cipher is not None:
            data = cipher.decrypt(lo, data)
        data = data[:hi - lo]
        rows[b] = _stored(update.grid, b, kernels.xxh3_128_blocks(data, BLOCK, threads=1))[0]
    await _write_rows(target, disk_id, rows, update.grid.n_blocks, target.sidecar_cipher(disk_id, state),
                      fresh=full or have is None)
    await _mark(target, disk_id, ip.stream)


async def digests(target, disk_id, block_size: int):
    """(n, 2) uint64 digests of the replica's blocks for a checksum resync; None for another block size
    or a replica with no data yet. Reads the sidecar when it is current, else rebuilds it from the blob."""
    state = await target._read_state(disk_id)
    if block_size != BLOCK or state.generation == 0:
        return None
    grid = Grid(BLOCK, state.disk_size)
    have = await _sidecar_state(target, disk_id)
    if state.ip is None and have and have == _stream_of(state, state.generation):
        blob = target.container.get_blob_client(sidecar_name(target, disk_id))
        raw = bytearray(_rows_size(grid.n_blocks))
        async for at, data in read_ranges(target, blob, len(raw), len(raw), target.sidecar_cipher(disk_id, state)):
            raw[at:at + len(data)] = data
        rows = np.frombuffer(bytes(raw[:grid.n_blocks * ROW]), "<u8").reshape(-1, 2).astype(np.uint64)
        zero = ~rows.any(axis=1)
        rows[zero] = grid.zero_digests(0, grid.n_blocks)[zero]
        return rows
    return await rebuild(target, disk_id, state)


async def rebuild(target, disk_id, state) -> np.ndarray:
    """Digest the blob's pages (decrypted) as they are and write them as a new sidecar: for the committed
    generation, or, with a stream half-applied, marked in doubt (it describes no generation; the resync
    it serves levels the blob without undoing that stream first: target._begin)."""
    grid = Grid(BLOCK, state.disk_size)
    out = grid.zero_digests(0, grid.n_blocks)
    blob, cipher = target.blob(disk_id), target.cipher_for(disk_id, state.key_id)
    area = align_up(state.disk_size)
    ranges = [(s - s % BLOCK, min(area, -(-e // BLOCK) * BLOCK)) for s, e in await page_ranges(target, blob, area)]
    merged: list[tuple[int, int]] = []
    for s, e in ranges:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
        else:
            merged.append((s, e))
    async for at, data in read_ranges(target, blob, area, area, cipher, ranges=merged):
        data = data[:max(0, min(len(data), state.disk_size - at))]
        first = at // BLOCK
        d = kernels.xxh3_128_blocks(data, BLOCK, threads=1)
        out[first:first + len(d)] = d
    rows = {b: r for b, r in enumerate(_stored(grid, 0, out)) if r.any()}
    await _write_rows(target, disk_id, rows, grid.n_blocks, target.sidecar_cipher(disk_id, state), fresh=True)
    await _mark(target, disk_id, _stream_of(state, state.generation) if state.ip is None else "")
    return out

"""Reading a page blob (or a snapshot) back: only its valid page ranges (the rest reads as zeros), in
pieces read a few at a time, decrypted when the replica is encrypted. Failover, export, digests and the
digest sidecar's verification all read through here."""
from __future__ import annotations

import asyncio

from .. import kernels
from .errors import VerifyError

PIECE = 8 << 20                  # bytes per read request
READ_AHEAD = 4                   # reads in flight


async def page_ranges(target, blob, size: int) -> list[tuple[int, int]]:
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


async def read(target, blob, offset: int, length: int) -> bytes:
    async def get(**kw):
        stream = await blob.download_blob(offset=offset, length=length, **kw)
        return await stream.readall()
    data = await target._call(f"read {blob.blob_name} [{offset}, {offset + length})", get)
    if len(data) != length:
        raise VerifyError(f"{blob.blob_name}: read {len(data)} of {length} bytes at {offset}")
    return data


async def read_ranges(target, blob, size: int, area: int | None = None, cipher=None,
                      ranges: list[tuple[int, int]] | None = None):
    """(offset, bytes) of the blob's valid ranges below `size`, in order; with `cipher`, the bytes below
    `area` (the disk's sectors, not the footer) are decrypted."""
    ranges = await page_ranges(target, blob, size) if ranges is None else ranges
    pieces = [(s, min(s + PIECE, e)) for s, e in ranges for s in range(s, e, PIECE)]
    for i in range(0, len(pieces), READ_AHEAD):
        batch = pieces[i:i + READ_AHEAD]
        datas = await asyncio.gather(*(read(target, blob, s, e - s) for s, e in batch))
        for (s, e), data in zip(batch, datas):
            if cipher is not None and area is not None and s < area:
                cut = min(e, area) - s
                data = await asyncio.to_thread(cipher.decrypt, s, data[:cut]) + data[cut:]
            yield s, data


_ZERO = bytes(PIECE)


def hash_zeros(hasher, n: int) -> None:
    while n > 0:
        k = min(n, PIECE)
        hasher.update(memoryview(_ZERO)[:k])
        n -= k


async def blob_digest(target, blob, size: int, area: int | None = None, cipher=None) -> bytes:
    """XXH3-128 of a blob's content (0..size, decrypted with `cipher`): equal content gives equal digests
    however the pages came to be (written zeros or never written)."""
    hasher, pos = kernels.Xxh3Hasher(), 0
    async for s, data in read_ranges(target, blob, size, area, cipher):
        hash_zeros(hasher, s - pos)
        hasher.update(data)
        pos = s + len(data)
    hash_zeros(hasher, size - pos)
    return hasher.digest()

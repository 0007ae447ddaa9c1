"""Shared pieces of the Azure tests: a primary disk in memory that emits cycles as delta streams, clients
on the session's Azurite with a wire counter, and reading a blob back."""
from __future__ import annotations

import asyncio
import os
import random
import time
import uuid

from replicator import delta
from replicator.azure import AzureTarget
from replicator.azure.azurite import RequestCounter
from tests.delta.helpers import MemDisk

KiB, MiB = 1 << 10, 1 << 20


class Primary:
    """A disk and its history: each cycle is one delta stream file plus the disk's bytes at the cut."""

    def __init__(self, tmp, size: int, seed: int = 1, disk_id: uuid.UUID | None = None):
        self.tmp, self.size = str(tmp), size
        self.disk = MemDisk(size)
        self.rng = random.Random(seed)
        self.disk_id = disk_id or uuid.uuid4()
        self.generation = 0
        self.history: dict[int, bytes] = {}
        self.clock = time.time               # the primary's clock: the cut time streams carry
        self.consistency: str | None = None  # None: a random one per stream

    def _header(self, kind: str) -> delta.StreamHeader:
        return delta.StreamHeader(self.disk_id, self.size, block_size=256 * KiB, generation=self.generation + 1,
                                  base_generation=self.generation, created=self.clock(), kind=kind,
                                  consistency=self.consistency or self.rng.choice(["crash", "application"]))

    def scatter(self, n: int, max_len: int = 200 * KiB, aligned: bool = False) -> None:
        """Random writes (random bytes or text) without emitting a stream (initial content)."""
        for _ in range(n):
            length = self.rng.randrange(1, max_len)
            off = self.rng.randrange(0, self.size - length)
            if aligned:
                off, length = off - off % 512, max(512, length - length % 512)
            self.disk.write(off, self._bytes(length))

    def _bytes(self, n: int) -> bytes:
        if self.rng.random() < 0.5:
            return self.rng.randbytes(n)
        return (b"replicator azure page blob " * (n // 27 + 1))[:n]

    def initial(self) -> tuple[str, str]:
        """The full stream of the disk as it is (encode_disk: ZERO extents skipped)."""
        return self._emit("full", lambda enc: None, whole=True)

    def cycle(self, writes: int = 12, zeros: int = 3, trims: int = 2, max_len: int = 300 * KiB) -> tuple[str, str]:
        """A delta stream of random writes (unaligned too), zeroed and trimmed ranges."""
        ops = ["w"] * writes + ["z"] * zeros + ["t"] * trims
        self.rng.shuffle(ops)
        extents = []
        for op in ops:
            length = self.rng.randrange(1, max_len)
            off = self.rng.randrange(0, self.size - length)
            extents.append((op, off, length))
        extents.sort(key=lambda e: e[1])
        merged, end = [], 0
        for op, off, length in extents:      # streams from logs never overlap: keep ranges disjoint
            if off < end:
                continue
            merged.append((op, off, length))
            end = off + length

        def body(enc):
            for op, off, length in merged:
                if op == "w":
                    data = self._bytes(length)
                    self.disk.write(off, data)
                    enc.add_data(off, data)
                elif op == "z":
                    self.disk.write_zeroes(off, length)
                    enc.add_zero(off, length)
                else:
                    self.disk.write_zeroes(off, length)
                    enc.add_trim(off, length)
        return self._emit("delta", body)

    def _emit(self, kind: str, body, whole: bool = False) -> tuple[str, str]:
        stream_id = uuid.uuid4().hex
        path = os.path.join(self.tmp, f"{stream_id}.delta")
        header = self._header(kind)
        with open(path, "wb") as sink:
            if whole:
                delta.encode_disk(self.disk, header, sink)
            else:
                enc = delta.DeltaEncoder(header, sink)
                body(enc)
                enc.finish()
        self.generation += 1
        self.history[self.generation] = bytes(self.disk.buf)
        return stream_id, path

    def undo_last(self) -> None:
        """Forget the last emitted cycle (it was never applied)."""
        self.history.pop(self.generation)
        self.generation -= 1
        self.disk.buf[:] = self.history.get(self.generation, bytes(self.size))


def container_name(tag: str = "t") -> str:
    return f"{tag}-{uuid.uuid4().hex[:16]}"


async def new_container(azurite, tag: str = "t", create: bool = True, counter: RequestCounter | None = None,
                        conn: str | None = None, **kw):
    from azure.storage.blob.aio import ContainerClient
    c = ContainerClient.from_connection_string(conn or azurite.connection_string, container_name(tag),
                                               raw_request_hook=counter, **kw)
    if create:
        await c.create_container()
    return c


def other_client(azurite, container, counter: RequestCounter | None = None, **kw):
    """A second client of the same container (another process's view, another writer)."""
    from azure.storage.blob.aio import ContainerClient
    return ContainerClient.from_connection_string(azurite.connection_string, container.container_name,
                                                  raw_request_hook=counter, **kw)


async def blob_bytes(container, name: str, snapshot: str | None = None) -> bytes:
    b = container.get_blob_client(name, snapshot=snapshot)
    return await (await b.download_blob()).readall()


def target(container, **kw) -> AzureTarget:
    kw.setdefault("retention", 4)
    kw.setdefault("concurrency", 4)
    return AzureTarget(container, **kw)


def run(coro):
    return asyncio.run(coro)

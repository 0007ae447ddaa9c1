"""Where replicated disks go: one small interface for every replica target (restic's idea for stores).

A target holds disks by id; a cycle is one delta stream, uploaded resumably under a stream id and then
committed. Retry and bandwidth limits are decorators stacked around any target, so the local store, a peer
replica host and Azure page blobs all get them the same way and pass the same conformance suite.
"""
from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass

from ..errors import ReplicatorError, UsageError


class TargetUnavailable(ReplicatorError):
    """The target could not be reached or answered with a temporary failure; retrying may succeed."""

    exit_code = 13


@dataclass(frozen=True)
class DiskInfo:
    disk_id: str
    size: int
    generation: int
    committed: tuple[str, ...] = ()      # recent stream ids the target has applied (commits are idempotent)
    failed_over: bool = False            # failed over on the replica site: it takes no more cycles from here
    adopted: bool = False                # starts from an existing copy: the first cycle is a checksum resync


@dataclass(frozen=True)
class PointInfo:
    generation: int
    time: float
    consistency: str


class ReplicaTarget:
    """The interface. Streams are files on the primary (the outbox), read from any offset on resume."""

    name = "target"

    async def ensure_disk(self, disk_id: uuid.UUID, size: int, name: str = "", machine: str = "") -> DiskInfo:
        """The target's copy of the disk, created empty on first use; `machine` names the protected machine
        the disk belongs to, so a replica site can fail over a machine's disks together."""
        raise NotImplementedError

    async def disk_info(self, disk_id: uuid.UUID) -> DiskInfo:
        raise NotImplementedError

    async def send(self, disk_id: uuid.UUID, stream_id: str, path, throttle=None) -> int:
        """Upload the stream (a path, or an OutboxStream the encoder is still writing: see outbox.py),
        resuming after what the target already holds; returns bytes sent. `throttle(n)`, when given, is
        awaited before each chunk of n bytes goes out."""
        raise NotImplementedError

    async def commit(self, disk_id: uuid.UUID, stream_id: str) -> PointInfo:
        raise NotImplementedError

    async def delete_disk(self, disk_id: uuid.UUID) -> bool:
        """Delete the replica of a disk and its recovery points (protection removed with
        delete_replica_on_remove); False when there was none."""
        raise NotImplementedError

    async def digests(self, disk_id: uuid.UUID, block_size: int):
        """XXH3-128 of every block of the replica ((n, 2) uint64), for a checksum resync; None when the
        target holds no comparable copy or cannot compute them (then resync sends every dirty region)."""
        return None

    async def checkpoint(self, disk_id: uuid.UUID, generation: int, point: int, prepared: bool = False,
                         additional_points: int | None = None, disks: int | None = None) -> None:
        """Tell the target that `generation` ends the machine's cycle `point` (one cut across its disks);
        `prepared`: the primary stopped and that was its final cycle (planned failover); `additional_points`:
        the hourly recovery points the protection keeps; `disks`: how many disks the machine has (a disk of
        several keeps its previous cut until its siblings reach the new one). Targets that cannot keep it
        ignore it: their machine points fall back to generations common to all disks."""

    async def put_config(self, machine: str, payload: dict, disk_ids: list[str]) -> bool:
        """Keep the machine's replicated configuration (a libvirt domain's: daemon/domains.py) next to the
        replica of each of `disk_ids`, for a failover to define the machine from; False when the target keeps
        none (Azure, an older replica host)."""
        return False

    async def close(self) -> None:
        pass


class Decorator(ReplicaTarget):
    def __init__(self, inner: ReplicaTarget):
        self.inner = inner
        self.name = inner.name

    async def ensure_disk(self, disk_id, size, name="", machine=""):
        return await self.inner.ensure_disk(disk_id, size, name, machine)

    async def disk_info(self, disk_id):
        return await self.inner.disk_info(disk_id)

    async def send(self, disk_id, stream_id, path, throttle=None):
        return await self.inner.send(disk_id, stream_id, path, throttle)

    async def commit(self, disk_id, stream_id):
        return await self.inner.commit(disk_id, stream_id)

    async def digests(self, disk_id, block_size):
        return await self.inner.digests(disk_id, block_size)

    async def delete_disk(self, disk_id):
        return await self.inner.delete_disk(disk_id)

    async def checkpoint(self, disk_id, generation, point, prepared=False, additional_points=None, disks=None):
        return await self.inner.checkpoint(disk_id, generation, point, prepared, additional_points, disks)

    async def put_config(self, machine, payload, disk_ids):
        return await self.inner.put_config(machine, payload, disk_ids)

    async def close(self):
        await self.inner.close()


class Retry(Decorator):
    """Retry temporary failures with exponential backoff and jitter; a resumed send continues, never restarts."""

    def __init__(self, inner: ReplicaTarget, attempts: int = 5, base_delay: float = 0.2, max_delay: float = 10.0):
        super().__init__(inner)
        self.attempts, self.base_delay, self.max_delay = attempts, base_delay, max_delay
        self.retries = 0

    async def _with_retry(self, call):
        for attempt in range(self.attempts):
            try:
                return await call()
            except (TargetUnavailable, ConnectionError, asyncio.TimeoutError):
                if attempt == self.attempts - 1:
                    raise
                self.retries += 1
                delay = min(self.max_delay, self.base_delay * 2 ** attempt)
                await asyncio.sleep(delay * (0.5 + random.random() / 2))

    async def ensure_disk(self, disk_id, size, name="", machine=""):
        return await self._with_retry(lambda: self.inner.ensure_disk(disk_id, size, name, machine))

    async def disk_info(self, disk_id):
        return await self._with_retry(lambda: self.inner.disk_info(disk_id))

    async def send(self, disk_id, stream_id, path, throttle=None):
        return await self._with_retry(lambda: self.inner.send(disk_id, stream_id, path, throttle))

    async def commit(self, disk_id, stream_id):
        return await self._with_retry(lambda: self.inner.commit(disk_id, stream_id))

    async def checkpoint(self, disk_id, generation, point, prepared=False, additional_points=None, disks=None):
        return await self._with_retry(lambda: self.inner.checkpoint(disk_id, generation, point, prepared,
                                                                    additional_points, disks))

    async def put_config(self, machine, payload, disk_ids):
        return await self._with_retry(lambda: self.inner.put_config(machine, payload, disk_ids))


class ForMachine(Decorator):
    """The targets of one protected machine: every disk it ensures carries the machine's name, which the
    replica keeps to group the machine's disks (cycle code stays unaware of machines)."""

    def __init__(self, inner: ReplicaTarget, machine: str):
        super().__init__(inner)
        self.machine = machine

    async def ensure_disk(self, disk_id, size, name="", machine=""):
        return await self.inner.ensure_disk(disk_id, size, name, machine or self.machine)


class TokenBucket:
    """`rate` bytes per second on average, bursts of at most `burst` bytes (one second's worth unless
    given); shared by everything a bandwidth limit covers. A request larger than the burst waits for a full
    bucket and leaves it in debt, so the average still holds."""

    def __init__(self, rate: float, burst: int | None = None):
        if rate <= 0:
            raise UsageError("bandwidth limit must be positive")
        self.rate = float(rate)
        self.burst = int(burst or rate)
        self.tokens = float(self.burst)
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            need = min(n, self.burst)
            if self.tokens >= need:
                self.tokens -= n
                return
            await asyncio.sleep((need - self.tokens) / self.rate)


class BandwidthLimit(Decorator):
    """Caps the bytes per second of every send through it (one bucket for all disks of a protection)."""

    def __init__(self, inner: ReplicaTarget, bytes_per_second: float):
        super().__init__(inner)
        self.bucket = TokenBucket(bytes_per_second)

    async def send(self, disk_id, stream_id, path, throttle=None):
        async def both(n):
            await self.bucket.take(n)
            if throttle is not None:
                await throttle(n)
        return await self.inner.send(disk_id, stream_id, path, both)

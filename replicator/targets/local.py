"""A replica store on this host as a target (tests, demos, and replicating to a locally mounted volume)."""
from __future__ import annotations

import asyncio
import uuid

from ..replica import ReplicaStore
from .base import DiskInfo, PointInfo, ReplicaTarget
from .outbox import OutboxStream


class LocalTarget(ReplicaTarget):
    name = "local"

    def __init__(self, root: str):
        self.store = ReplicaStore(root)

    async def ensure_disk(self, disk_id: uuid.UUID, size: int, name: str = "", machine: str = "") -> DiskInfo:
        rd = await asyncio.to_thread(self.store.ensure_disk, disk_id, size, name=name, machine=machine)
        return _info(disk_id, rd)

    async def disk_info(self, disk_id: uuid.UUID) -> DiskInfo:
        return _info(disk_id, self.store.disk(disk_id))

    async def send(self, disk_id: uuid.UUID, stream_id: str, path: str, throttle=None) -> int:
        up = self.store.disk(disk_id).open_upload(stream_id)
        sent = 0
        try:
            async for chunk in OutboxStream.of(path).chunks(up.durable):
                if throttle is not None:
                    await throttle(len(chunk))
                await asyncio.to_thread(up.write, up.size, chunk)
                sent += len(chunk)
            await asyncio.to_thread(up.sync)
        finally:
            up.close()
        return sent

    async def delete_disk(self, disk_id: uuid.UUID) -> bool:
        return await asyncio.to_thread(self.store.remove, disk_id)

    async def digests(self, disk_id: uuid.UUID, block_size: int):
        rd = self.store.disk(disk_id)
        if rd.generation == 0 and not rd.state.adopted:
            return None

        def compute():
            from ..resync.scan import digest_disk
            with rd.open_image() as img:
                return digest_disk(img, block_size)[0]
        return await asyncio.to_thread(compute)

    async def commit(self, disk_id: uuid.UUID, stream_id: str) -> PointInfo:
        p = await asyncio.to_thread(self.store.disk(disk_id).commit, stream_id)
        return PointInfo(p.generation, p.time, p.consistency)

    async def checkpoint(self, disk_id: uuid.UUID, generation: int, point: int, prepared: bool = False,
                         additional_points: int | None = None, disks: int | None = None) -> None:
        await asyncio.to_thread(self.store.disk(disk_id).record_checkpoint, generation, point, prepared,
                                additional_points, disks)

    async def put_config(self, machine: str, payload: dict, disk_ids: list[str]) -> bool:
        from ..daemon.domains import write_config
        for disk_id in disk_ids:
            await asyncio.to_thread(write_config, self.store.disk(disk_id).path, payload)
        return True


def _info(disk_id, rd) -> DiskInfo:
    return DiskInfo(str(disk_id), rd.state.size, rd.generation, tuple(sid for sid, _ in rd.state.committed),
                    bool(rd.state.failover), bool(rd.state.adopted))

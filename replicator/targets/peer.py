"""A replica host reached over HTTPS with mutual certificates (8084) or HTTP with Kerberos (8083)."""
from __future__ import annotations

import uuid

from ..transport.client import ReplicaClient
from .base import DiskInfo, PointInfo, ReplicaTarget


class PeerTarget(ReplicaTarget):
    name = "peer"

    def __init__(self, url: str, *, cert=None, key=None, ca=None, kerberos: bool = False,
                 bandwidth_limit: float | None = None, **client_options):
        self.client = ReplicaClient(url, cert=cert, key=key, ca=ca, kerberos=kerberos,
                                    bandwidth_limit=bandwidth_limit, **client_options)

    async def ensure_disk(self, disk_id: uuid.UUID, size: int, name: str = "") -> DiskInfo:
        return _info(await self.client.ensure_disk(disk_id, size, name=name))

    async def disk_info(self, disk_id: uuid.UUID) -> DiskInfo:
        return _info(await self.client.state(disk_id))

    async def send(self, disk_id: uuid.UUID, stream_id: str, path: str, throttle=None) -> int:
        before = self.client.bytes_sent
        await self.client.send_stream(disk_id, stream_id, path, commit=False)
        return self.client.bytes_sent - before

    async def commit(self, disk_id: uuid.UUID, stream_id: str) -> PointInfo:
        point = (await self.client.commit(disk_id, stream_id))["point"]
        return PointInfo(point["generation"], point["time"], point["consistency"])

    async def close(self) -> None:
        await self.client.close()


def _info(view: dict) -> DiskInfo:
    return DiskInfo(view["disk_id"], view["size"], view["generation"], tuple(view.get("committed", ())))

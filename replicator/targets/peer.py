"""A replica host reached over HTTPS with mutual certificates (8084) or HTTP with Kerberos (8083)."""
from __future__ import annotations

import uuid

import numpy as np

from ..transport.auth import ReplicaRefused
from ..transport.client import ReplicaClient
from .base import DiskInfo, PointInfo, ReplicaTarget


class PeerTarget(ReplicaTarget):
    name = "peer"

    def __init__(self, url: str, *, cert=None, key=None, ca=None, kerberos: bool = False,
                 bandwidth_limit: float | None = None, **client_options):
        self.client = ReplicaClient(url, cert=cert, key=key, ca=ca, kerberos=kerberos,
                                    bandwidth_limit=bandwidth_limit, **client_options)

    async def ensure_disk(self, disk_id: uuid.UUID, size: int, name: str = "", machine: str = "") -> DiskInfo:
        return _info(await self.client.ensure_disk(disk_id, size, name=name, machine=machine))

    async def disk_info(self, disk_id: uuid.UUID) -> DiskInfo:
        return _info(await self.client.state(disk_id))

    async def send(self, disk_id: uuid.UUID, stream_id: str, path: str, throttle=None) -> int:
        before = self.client.bytes_sent
        await self.client.send_stream(disk_id, stream_id, path, commit=False)
        return self.client.bytes_sent - before

    async def commit(self, disk_id: uuid.UUID, stream_id: str) -> PointInfo:
        point = (await self.client.commit(disk_id, stream_id))["point"]
        return PointInfo(point["generation"], point["time"], point["consistency"])

    async def delete_disk(self, disk_id: uuid.UUID) -> bool:
        return await self.client.delete_disk(disk_id)

    async def digests(self, disk_id: uuid.UUID, block_size: int):
        try:
            raw = await self.client.digests(disk_id, block_size)
        except ReplicaRefused as e:
            if _older_replica(e):
                return None
            raise
        return None if raw is None else np.frombuffer(raw, dtype="<u8").reshape(-1, 2)

    async def checkpoint(self, disk_id: uuid.UUID, generation: int, point: int, prepared: bool = False,
                         additional_points: int | None = None, disks: int | None = None) -> None:
        try:
            await self.client.checkpoint(disk_id, generation, point, prepared=prepared,
                                         additional_points=additional_points, disks=disks)
        except ReplicaRefused as e:
            if not _older_replica(e) or prepared:
                raise

    async def put_config(self, machine: str, payload: dict, disk_ids: list[str]) -> bool:
        """PUT /v1/disks/ID/domain for each disk (through the client's request path: its retries and
        authentication); False when the replica host predates the route."""
        try:
            for disk_id in disk_ids:
                await self.client._retrying(self.client._request, "PUT", f"/v1/disks/{disk_id}/domain",
                                            json=payload)
        except ReplicaRefused as e:
            if _older_replica(e):
                return False
            raise
        return True

    async def close(self) -> None:
        await self.client.close()


def _older_replica(e: ReplicaRefused) -> bool:
    """A replica host from before this route: it answers an unknown path, not a missing disk."""
    return e.status == 404 and e.code != "not_found"


def _info(view: dict) -> DiskInfo:
    return DiskInfo(view["disk_id"], view["size"], view["generation"], tuple(view.get("committed", ())),
                    bool(view.get("failed_over")), bool(view.get("adopted")))

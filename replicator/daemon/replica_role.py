"""The replica role of replicatord: the transport server with the configured authorization entries and
storage locations."""
from __future__ import annotations

from ..transport.auth import AuthorizationEntry
from ..transport.server import ReplicaServer


class ReplicaRole:
    def __init__(self, server: ReplicaServer):
        self.server = server

    def status(self) -> dict:
        return {"url": self.server.url, "mode": self.server.mode, "counters": dict(self.server.counters)}

    async def stop(self) -> None:
        await self.server.stop()


async def start_replica_role(settings) -> ReplicaRole:
    entries = [AuthorizationEntry(a.principal, a.storage, a.trust_group) for a in settings.allow]
    mode = "kerberos" if settings.auth == "kerberos" else "cert"
    server = ReplicaServer(entries, mode=mode, host=settings.listen, port=settings.port, certfile=settings.cert,
                           keyfile=settings.key, cafile=settings.ca, keytab=settings.keytab,
                           limits=settings.limits)
    return ReplicaRole(await server.start())

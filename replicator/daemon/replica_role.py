"""The replica role of replicatord: the transport server with the configured authorization entries and
storage locations, and the extended replication legs that forward what it applies to a third site."""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ..errors import CannotListen, ReplicatorError
from ..targets.factory import open_target
from ..transport.auth import AuthorizationEntry
from ..transport.server import ReplicaServer
from .extended import ExtendedLeg

log = logging.getLogger("replicatord")


class ReplicaRole:
    def __init__(self, server: ReplicaServer, legs: list[ExtendedLeg] = ()):
        self.server = server
        self.legs = list(legs)
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(leg.run(self._stop), name=f"extended-{leg.name}") for leg in self.legs]

    def status(self) -> dict:
        out = {"url": self.server.url, "mode": self.server.mode, "counters": dict(self.server.counters)}
        if self.legs:
            out["extended"] = [leg.status() for leg in self.legs]
        return out

    def add_routes(self, app: web.Application) -> None:
        """Admin API: GET /v1/extended (every leg's status), POST /v1/extended/NAME/cycle (one now)."""
        app.router.add_get("/v1/extended", self._list)
        app.router.add_post("/v1/extended/{name}/cycle", self._cycle)

    async def _list(self, request) -> web.Response:
        return web.json_response({"extended": [leg.status() for leg in self.legs]})

    async def _cycle(self, request) -> web.Response:
        leg = next((g for g in self.legs if g.name == request.match_info["name"]), None)
        if leg is None:
            return web.json_response({"error": f"no extended leg for machine {request.match_info['name']!r}"},
                                     status=404)
        try:
            r = await leg.cycle()
        except (ReplicatorError, OSError) as e:
            return web.json_response({"error": leg.reason or str(e)}, status=409)
        return web.json_response({"point": r.point, "bytes_sent": r.bytes_sent, "bytes_changed": r.bytes_changed,
                                  "seconds": r.seconds, "status": leg.status()})

    async def continue_extended(self, name: str, site) -> None:
        """`name`, which has an extended leg, was failed over to this site and the failover committed: the
        leg goes on from here, this site now its primary (as Hyper-V's does). The point the failover used is
        forwarded first, then the running machine is protected towards the extended site, whose copy is
        the starting point (a checksum resync levels it after an unplanned failover)."""
        leg = next((g for g in self.legs if g.name == name), None)
        if leg is None or leg.state == "Continued":
            return
        try:
            await leg.cycle()
        except (ReplicatorError, OSError) as e:
            log.warning("%s: the extended site could not take the last point before the leg continues from "
                        "here: %s", name, leg.reason or e)
        s = leg.settings
        body = {"target": s.target, "frequency": int(s.frequency), "additional_points": s.additional_points,
                "compression": s.compression}
        body.update({k: v for k, v in (("cert", s.cert), ("key", s.key), ("ca", s.ca),
                                       ("bandwidth_limit", s.bandwidth_limit)) if v})
        if s.kerberos:
            body["auth"] = "kerberos"
        await site.reverse(name, body)
        leg.continued()

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:               # a leg mid-cycle resumes from its persisted state next start
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for leg in self.legs:
            await leg.target.close()
        await self.server.stop()


async def start_replica_role(settings, config=None) -> ReplicaRole:
    entries = [AuthorizationEntry(a.principal, a.storage, a.trust_group) for a in settings.allow]
    mode = "kerberos" if settings.auth == "kerberos" else "cert"
    server = ReplicaServer(entries, mode=mode, host=settings.listen, port=settings.port, certfile=settings.cert,
                           keyfile=settings.key, cafile=settings.ca, keytab=settings.keytab,
                           limits=settings.limits)
    try:
        await server.start()
    except OSError as e:
        raise CannotListen(f"the replica role cannot listen on {settings.listen}:{settings.port}: {e.strerror} "
                           "(another server there? [replica] port)") from None
    legs = []
    for ext in getattr(config, "extended", None) or []:
        target = open_target(ext.target, cert=ext.cert, key=ext.key, ca=ext.ca, kerberos=ext.kerberos,
                             bandwidth_limit=ext.bandwidth_limit, machine=ext.machine)
        legs.append(ExtendedLeg(ext, target, config.daemon.state_dir))
    return ReplicaRole(server, legs)

"""Run a tracked NBD export on its own event-loop thread (uvloop when available).

Other threads (the shipper, tests, the daemon) call cut() and stop(); both run on the loop, between
requests, so a cut is one instant across all disks of the machine and writes pause only for the seal.
"""
from __future__ import annotations

import asyncio
import os
import threading

from .nbd import Export, NbdServer
from .tracker import SealedLog, TrackedDisk, TrackingGroup


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:                # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.new_event_loop()


class ExportService:
    def __init__(self, disks: dict[str, TrackedDisk], *, socket_path: str | None = None,
                 port: int | None = None, host: str = "127.0.0.1"):
        if (socket_path is None) == (port is None):
            raise ValueError("give exactly one of socket_path and port")
        self.disks = disks
        self.group = TrackingGroup(list(disks.values()))
        self.socket_path, self.port, self.host = socket_path, port, host
        self.server = NbdServer([Export(name, d) for name, d in disks.items()])
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="nbd-export", daemon=True)
        self._stopped = False

    def start(self) -> "ExportService":
        self._thread.start()
        self._call(self._listen())
        return self

    async def _listen(self) -> None:
        if self.socket_path:
            if os.path.exists(self.socket_path):
                os.unlink(self.socket_path)
            await self.server.start_unix(self.socket_path)
        else:
            self.port = await self.server.start_tcp(self.host, self.port)

    def _call(self, coro, timeout: float | None = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def cut(self) -> list[SealedLog | None]:
        async def do_cut():
            return self.group.cut()
        return self._call(do_cut())

    def stop(self) -> None:
        """Close the listener and every connection, then close the disks cleanly (logs sealed)."""
        if self._stopped:
            return
        self._stopped = True

        async def shutdown():
            await self.server.close()
            for d in self.disks.values():
                d.close()
        try:
            self._call(shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
            if self.socket_path and os.path.exists(self.socket_path):
                os.unlink(self.socket_path)

    def uri(self, export: str = "") -> str:
        if self.socket_path:
            return f"nbd+unix:///{export}?socket={self.socket_path}"
        return f"nbd://{self.host}:{self.port}/{export}"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
